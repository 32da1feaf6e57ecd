-- mod_captions: relays Jitsi Meet's transcription toggles to the captions sidecar.
--
-- Loaded on the conference MUC component. It stands in for Jicofo + Jigasi:
--
--  * the CC button's dial IQ (<dial xmlns="urn:xmpp:rayo:1" to="jitsi_meet_transcribe">
--    sent to ROOM@conference.HOST/focus) is answered here, before it reaches the
--    focus, with the checks Jicofo's JigasiIqHandler and jitsi-meet's
--    mod_filter_iq_rayo make; StartTranscription + StartCaptions go to the sidecar,
--    whose hidden transcriber occupant then joins the room;
--  * the presence properties jitsi_participant_requestingTranscription,
--    _transcription_language and _translation_language keep the room's language
--    up to date and stop captions when nobody asks for them any more;
--  * rooms set to "auto-on" start on their first (or second) participant and end
--    when the last one leaves;
--  * whenever captions or a transcript are on in a room, the room metadata gets
--    asyncTranscription = true, recording.isTranscribingEnabled = true and
--    transcription.urlParams.room, so that Jicofo tells the videobridge to send
--    the room's audio to the sidecar (jicofo.transcription.url-template); both go
--    back off when nobody wants either (captions_videobridge_export = false
--    leaves the metadata alone, for audio that comes another way);
--  * recording.isTranscribingEnabled set by a participant (the recording
--    dialog's switch, or the CC button when asyncTranscription is on) starts a
--    transcript and captions; set to false it stops what a dial started;
--    captions_async_transcription marks every room at creation, which makes
--    jitsi-meet's CC button take that path instead of the dial;
--  * the transcriber gets into password-protected and members-only (lobby)
--    rooms; JvbRoomName may be a tenant's client-side JID
--    (room@conference.TENANT.BASE for [TENANT]room@conference.BASE);
--  * every room the sidecar serves gets the roster (endpoint id -> display name,
--    avatar) from the MUC, since the videobridge only knows endpoint ids;
--  * a periodic ListRooms notices a restarted sidecar and re-applies each room's
--    roster and starts, so a crashed transcriber comes back by itself.
--
-- Config: add "captions" to the modules_enabled list that the conference
-- component of /etc/prosody/conf.d/<domain>.cfg.lua already has (never a
-- second Component block: it would replace that list), then the options below
-- in the same component (only the first two are required):
--
--   Component "conference.meet.example.com" "muc"
--       modules_enabled = { ...the stock list..., "captions" }
--       -- where the sidecar's HTTP listener serves gRPC-Web (http:// or https://)
--       captions_sidecar_url = "http://127.0.0.1:8088"
--       -- the sidecar's bearer token: a file holding it (preferred) or the token itself
--       captions_token_file = "/etc/jitsi/captions/token"
--       -- captions_token = "..."
--       captions_request_timeout = 5          -- seconds per call, 0.2..60 (a timeout is not retried)
--       captions_retries = 2                  -- extra attempts on UNAVAILABLE (refused, reset, 503), 0..10
--       captions_retry_backoff = 0.5          -- seconds before the first retry, doubled each time, 0.05..30
--       -- captions_language = "en-US"        -- room language when nobody says otherwise
--                                             -- (unset: the sidecar's default)
--       -- when rooms may or must have them; the module starts "auto-on" rooms itself,
--       -- so set these here. Set ones are also sent to the sidecar as room settings.
--       captions_transcription_mode = "available" -- "disabled" | "available" | "auto-on"
--       captions_captions_mode = "available"      -- "disabled" | "available" | "auto-on"
--       captions_trigger = "manual"           -- "manual" | "automatic" | "automatic-2nd-participant"
--       captions_transcriber_jid = "transcriber@recorder.meet.example.com"
--       captions_hidden_domain = "recorder.meet.example.com" -- default: the transcriber's domain
--       captions_exclude_domains = { "auth.meet.example.com" } -- focus, jigasi: not counted
--       captions_async_transcription = false  -- mark rooms so the CC button uses the metadata path
--       captions_videobridge_export = true    -- turn the bridge's audio export on through the metadata
--       -- muc_mapper_domain_base = "meet.example.com" -- tenants: conference.TENANT.<this> (default: <base>)
--       captions_health_check_interval = 15   -- seconds between ListRooms, 1..3600; 0 turns it off
--
-- Defaults: the transcriber is transcriber@recorder.<base> and the excluded
-- domain auth.<base>, where <base> is this component's host without its first
-- label (conference.meet.example.com -> meet.example.com).
--
-- Per-room settings, set server-side in the room metadata (room.jitsiMetadata),
-- override the deployment's:
--   room.jitsiMetadata.captions = { language = "de", captions_mode = "auto-on",
--       transcription_mode = "disabled", trigger = "automatic",
--       translation_languages = { "en" }, interim_results = true }
-- mod_room_metadata_component lets moderators set keys that are not blocked: add
-- "captions" to room_metadata_blocked_keys if only the server may choose them.
--
-- Dial IQ answers: result with <ref xmlns="urn:xmpp:rayo:1" uri="xmpp:TRANSCRIBER_JID"/>
-- once the sidecar has started captions (UpdateSettings, UpdateRoster,
-- StartTranscription, StartCaptions, each under the timeout); errors, each with a <text>:
--   forbidden            not an occupant of the room, JvbRoomName names another
--                        room, or jitsi-meet's is_feature_allowed says no: a
--                        token features table without "transcription" true, else
--                        granted features without it, else not a moderator
--   bad-request          no JvbRoomName header, or one that is not a room JID
--   item-not-found       no such room
--   not-allowed          captions are disabled for the room
--   conflict             the transcriber is already in the room
--   service-unavailable  the sidecar is down, timed out or answered an error
--
-- Metrics (Prosody's OpenMetrics endpoint, prefix prosody_mod_captions/):
--   dial_iqs{outcome}, sidecar_calls{method,code}, reapplies, rooms_engaged.

local st = require "util.stanza";
local jid_lib = require "util.jid";
local http = require "net.http";
local time_now = require "util.time".now;

local codec = module:require "captions_codec";
local muc = module:depends "muc";

local jid_split, jid_resource, jid_host, jid_prep = jid_lib.split, jid_lib.resource, jid_lib.host, jid_lib.prep;
local jid_bare = jid_lib.bare;
local t_insert, t_concat, t_sort = table.insert, table.concat, table.sort;
local m_min, m_max = math.min, math.max;
local utf8_len, utf8_offset = utf8.len, utf8.offset;

local RAYO = "urn:xmpp:rayo:1";
local TRANSCRIBE_TARGET = "jitsi_meet_transcribe";
local NICK_NS = "http://jabber.org/protocol/nick";
local MUC_NS = "http://jabber.org/protocol/muc";
local P_REQUESTING = "jitsi_participant_requestingTranscription";
local P_LANGUAGE = "jitsi_participant_transcription_language";
local P_TRANSLATION = "jitsi_participant_translation_language";
local KINDS = { "transcription", "captions" };
local START_METHOD = { transcription = "StartTranscription", captions = "StartCaptions" };
local STOP_METHOD = { transcription = "StopTranscription", captions = "StopCaptions" };

local MODES = { disabled = "MODE_DISABLED", available = "MODE_AVAILABLE", ["auto-on"] = "MODE_AUTO_ON" };
local TRIGGERS = {
	manual = "TRIGGER_MANUAL",
	automatic = "TRIGGER_AUTOMATIC",
	["automatic-2nd-participant"] = "TRIGGER_AUTOMATIC_2ND_PARTICIPANT",
};

--------------------------------------------------------------------------------
-- Options
--------------------------------------------------------------------------------

local function number_option(name, default, min, max)
	local value = module:get_option_number(name, default);
	if value == nil or value ~= value then -- not a number (get_option_number logged it)
		value = default;
	end
	if value < min or value > max then
		local clamped = m_max(min, m_min(max, value));
		module:log("warn", "%s = %s is out of range (%s..%s); using %s", name, value, min, max, clamped);
		value = clamped;
	end
	return value;
end

local function choice_option(name, default, choices)
	local value = module:get_option_string(name, default);
	local key = value:lower():gsub("_", "-");
	if not choices[key] then
		local names = {};
		for k in pairs(choices) do names[#names + 1] = k; end
		t_sort(names);
		module:log("error", "%s = %q is not one of %s; using %q", name, value, t_concat(names, ", "), default);
		key = default;
	end
	return key;
end

local function trim(s)
	return (s:match("^%s*(.-)%s*$"));
end

local sidecar_url = module:get_option_string("captions_sidecar_url");
if not sidecar_url or not sidecar_url:match("^https?://[^/%s]+") then
	module:log("error", "captions_sidecar_url is required (e.g. \"http://127.0.0.1:8088\"), got %q; not loading",
		tostring(sidecar_url));
	return;
end
sidecar_url = sidecar_url:gsub("/+$", "");

local token;
do
	local token_file = module:get_option_path("captions_token_file", nil, "config");
	local inline = module:get_option_string("captions_token");
	if token_file then
		local f, err = io.open(token_file, "r");
		if not f then
			module:log("error", "captions_token_file: cannot read %q: %s; not loading", token_file, err);
			return;
		end
		token = trim(f:read("a") or "");
		f:close();
	elseif inline then
		token = trim(inline);
	end
	if not token or token == "" or token:find("[%c]") then
		module:log("error", "captions_token_file (or captions_token) is required and must hold the sidecar's token; not loading");
		return;
	end
end

local request_timeout = number_option("captions_request_timeout", 5, 0.2, 60);
local retries = math.floor(number_option("captions_retries", 2, 0, 10));
local retry_backoff = number_option("captions_retry_backoff", 0.5, 0.05, 30);
local default_language = module:get_option_string("captions_language");
local default_transcription_mode = choice_option("captions_transcription_mode", "available", MODES);
local default_captions_mode = choice_option("captions_captions_mode", "available", MODES);
local default_trigger = choice_option("captions_trigger", "manual", TRIGGERS);
-- Modes and trigger go to the sidecar only where set (here or in the room
-- metadata), so that a sidecar's own defaults stay in force otherwise.
local explicit_policy = {
	transcription = module:get_option("captions_transcription_mode") ~= nil,
	captions = module:get_option("captions_captions_mode") ~= nil,
	trigger = module:get_option("captions_trigger") ~= nil,
};
local base_domain = module.host:gsub("^[^.]+%.", "");
local transcriber_jid = module:get_option_string("captions_transcriber_jid", "transcriber@recorder." .. base_domain);
transcriber_jid = jid_prep(transcriber_jid) or transcriber_jid;
local hidden_domain = module:get_option_string("captions_hidden_domain", jid_host(transcriber_jid));
local exclude_domains = module:get_option_set("captions_exclude_domains", { "auth." .. base_domain });
local async_transcription = module:get_option_boolean("captions_async_transcription", false);
-- Turn the videobridge's audio export on through the room metadata whenever this
-- module has captions or a transcript on in a room (see set_export below).
local export_audio = module:get_option_boolean("captions_videobridge_export", true);
-- Multi-tenant deployments: the client-side room JID room@conference.TENANT.BASE
-- is [TENANT]room@conference.BASE inside Prosody (jitsi-meet's muc_domain_mapper
-- and util.lib.lua room_jid_match_rewrite use the same two options).
local mapper_base = module:get_option_string("muc_mapper_domain_base", base_domain);
local mapper_prefix = module:get_option_string("muc_mapper_domain_prefix", module.host:match("^([^.]+)%.") or "conference");
local health_interval = module:get_option_number("captions_health_check_interval", 15) or 15;
if health_interval ~= 0 then
	health_interval = number_option("captions_health_check_interval", 15, 1, 3600);
end

--------------------------------------------------------------------------------
-- Metrics
--------------------------------------------------------------------------------

local dial_counter = module:metric("counter", "dial_iqs", "", "Transcription dial IQs answered, by outcome",
	{ "outcome" });
local call_counter = module:metric("counter", "sidecar_calls", "", "Calls to the captions sidecar, by method and gRPC status",
	{ "method", "code" });
local reapply_counter = module:metric("counter", "reapplies", "",
	"Rooms whose roster and starts were re-applied after the sidecar lost them", {});
local engaged_gauge = module:metric("gauge", "rooms_engaged", "", "Rooms this module keeps on the sidecar", {});

local function count_dial(outcome)
	dial_counter:with_labels(outcome):add(1);
end

--------------------------------------------------------------------------------
-- Sidecar transport: gRPC-Web over net.http, with a timeout and retries
--------------------------------------------------------------------------------

local STATUS_DEADLINE, STATUS_INTERNAL, STATUS_UNAVAILABLE = 4, 13, 14;

local function failure(code, name, message)
	return { ok = false, status = code, status_name = name, status_message = message };
end

-- Calls `method` with request table `msg`; callback(result) gets the codec's
-- decoded result ({ ok, status, status_name, status_message, response }).
-- UNAVAILABLE (connection refused, reset, 503) is retried with exponential
-- backoff; a timeout is not: a sidecar that hangs would hang again, and the
-- user waiting for the dial answer should not wait (retries + 1) timeouts.
local function sidecar_call(method, msg, callback)
	local ok, path, body, headers = pcall(codec.request, method, nil, msg,
		{ token = token, timeout = request_timeout });
	if not ok then
		module:log("error", "Cannot encode %s: %s", method, tostring(path));
		call_counter:with_labels(method, "INTERNAL"):add(1);
		callback(failure(STATUS_INTERNAL, "INTERNAL", "cannot encode the request"));
		return;
	end
	local url = sidecar_url .. path;
	local attempt = 0;
	local function try()
		attempt = attempt + 1;
		local done, req, timer = false, nil, nil;
		local started = time_now();
		local function finish(result)
			if done then return; end
			done = true;
			if timer then timer:stop(); end
			if result.status == STATUS_UNAVAILABLE and attempt <= retries then
				local delay = m_min(30, retry_backoff * 2 ^ (attempt - 1));
				module:log("debug", "%s: %s (%s); retry %d of %d in %.2f s", method, result.status_name,
					result.status_message, attempt, retries, delay);
				module:add_timer(delay, try);
				return;
			end
			call_counter:with_labels(method, result.status_name or "UNKNOWN"):add(1);
			if not result.ok then
				module:log("debug", "%s failed after %.3f s: %s %q", method, time_now() - started,
					tostring(result.status_name), tostring(result.status_message));
			end
			callback(result);
		end
		timer = module:add_timer(request_timeout, function ()
			if done then return; end
			timer = nil;
			finish(failure(STATUS_DEADLINE, "DEADLINE_EXCEEDED",
				("no answer from the sidecar within %g s"):format(request_timeout)));
			-- drop the connection; net.http calls back once more, which finish() ignores
			if req then
				if req.cancel then
					pcall(req.cancel, req, "timeout");
				elseif http.destroy_request then
					pcall(http.destroy_request, req);
				end
			end
		end);
		local sent, err = pcall(function ()
			req = http.request(url, { method = "POST", body = body, headers = headers, suppress_errors = true },
				function (response_body, code, response)
					finish(codec.decode_response(method, response_body, response and response.headers, code));
				end);
		end);
		if not sent then
			finish(failure(STATUS_UNAVAILABLE, "UNAVAILABLE", "HTTP request failed: " .. tostring(err)));
		end
	end
	try();
end

--------------------------------------------------------------------------------
-- Input cleaning
--------------------------------------------------------------------------------

-- The sidecar's endpoint id pattern ([A-Za-z0-9._~-]{1,64})
local function valid_endpoint(id)
	return type(id) == "string" and #id <= 64 and id:match("^[%w%._~%-]+$") ~= nil;
end

-- The sidecar's room name pattern: no spaces, quotes, slashes, '<', '>', '&', ':'
local function valid_room_jid(room_jid)
	local node, host = jid_split(room_jid);
	return node ~= nil and #node <= 256 and not node:find("[%s@/\\\"&'<>:]")
		and host ~= nil and #host <= 253 and host:match("^[%w%.%-]+$") ~= nil;
end

local function valid_meeting_id(id)
	return type(id) == "string" and #id <= 128 and id:match("^[%w%._%-]+$") ~= nil;
end

-- At most max_chars characters of valid UTF-8 without control characters, or nil.
local function clean_text(s, max_chars)
	if type(s) ~= "string" or not utf8_len(s) then return nil; end
	s = trim(s:gsub("%c", " "));
	if s == "" then return nil; end
	local cut = utf8_offset(s, max_chars + 1);
	if cut then s = s:sub(1, cut - 1); end
	return s;
end

local function clean_avatar(s)
	if type(s) ~= "string" then return nil; end
	s = trim(s);
	if #s > 2048 or not s:match("^https?://[^%s%c]+$") or not utf8_len(s) then return nil; end
	return s;
end

-- A BCP-47-looking tag ("en", "en-US", "pt_BR"); the sidecar checks it is supported.
local function clean_language(s)
	if type(s) ~= "string" then return nil; end
	s = trim(s);
	if #s > 35 or not s:match("^%a%a%a?$") and not s:match("^%a%a%a?[%-_][%w%-_]+$") then return nil; end
	return s;
end

local function primary_tag(lang)
	return lang and lang:match("^(%a+)"):lower();
end

-- Text of a child in jabber:client (lib-jitsi-meet's presence properties).
local function child_text(stanza, name)
	for _, tag in ipairs(stanza.tags) do
		if tag.name == name and (tag.attr.xmlns == nil or tag.attr.xmlns == "jabber:client") then
			return tag:get_text();
		end
	end
	return nil;
end

--------------------------------------------------------------------------------
-- Per-room policy: deployment defaults, then room metadata
--------------------------------------------------------------------------------

local function metadata_of(room)
	local md = room.jitsiMetadata;
	return type(md) == "table" and md or nil;
end

local function policy_of(room)
	local p = {
		transcription = default_transcription_mode,
		captions = default_captions_mode,
		trigger = default_trigger,
		language = clean_language(default_language),
		explicit = { transcription = explicit_policy.transcription, captions = explicit_policy.captions,
			trigger = explicit_policy.trigger },
	};
	local md = metadata_of(room);
	local c = md and md.captions;
	if type(c) == "table" then
		for field, choices in pairs({ transcription_mode = MODES, captions_mode = MODES, trigger = TRIGGERS }) do
			local v = c[field];
			if type(v) == "string" then
				local key = v:lower():gsub("_", "-");
				if choices[key] then
					local name = field == "trigger" and "trigger" or field:gsub("_mode$", "");
					p[name], p.explicit[name] = key, true;
				end
			end
		end
		p.language = clean_language(c.language) or p.language;
		if type(c.interim_results) == "boolean" then
			p.interim_results = c.interim_results;
		end
		if type(c.translation_languages) == "table" then
			p.translations = {};
			for _, lang in ipairs(c.translation_languages) do
				lang = clean_language(lang);
				if lang then t_insert(p.translations, lang); end
			end
		end
	end
	return p;
end

local function metadata_transcribing(room)
	local md = metadata_of(room);
	local rec = md and md.recording;
	return type(rec) == "table" and rec.isTranscribingEnabled == true;
end

local function auto_need(trigger)
	return trigger == "automatic-2nd-participant" and 2 or 1;
end

--------------------------------------------------------------------------------
-- Room state
--------------------------------------------------------------------------------

-- room jid -> state. A state keeps what this module wants the sidecar to do for
-- the room (sources: why each kind should be on) and what the sidecar has
-- confirmed (applied); reconcile() sends the calls that close the gap, one at a
-- time per room, so calls for a room never overtake each other.
local rooms = {};
local seq = 0;
local function next_seq()
	seq = seq + 1;
	return seq;
end

local function new_state(room)
	return {
		jid = room.jid,
		room = room,
		people = {},          -- occupant nick -> { id, name, avatar, counted, requesting, lang, lang_seq, tlang }
		count = 0,            -- counted participants (not focus, hidden, transcriber or excluded domains)
		sources = { transcription = {}, captions = {} }, -- "dial" | "auto" | "metadata" | "api" -> true
		stop_reason = {},     -- kind -> StopReason of the next stop
		pinned = {},          -- kind -> true: the sidecar refused to stop it (automatic trigger)
		applied = { transcription = false, captions = false },
		engaged = false,      -- the sidecar has (or is being given) this room
		known = false,        -- the sidecar answered a call about it
		uncertain = {},       -- kind -> true: a start timed out, it may be on there
		roster_synced = false,
		pending_upserts = {}, -- endpoint id -> participant
		pending_left = {},    -- endpoint id -> true
		settings_sent = nil,  -- key of the last settings the sidecar accepted
		waiters = {},         -- dial IQs waiting for StartCaptions
		requested_seen = false,
		dial_confirmed = false,
		end_pending = false,
		destroyed = false,
		busy = false,
		dirty = false,
		failed = false,
		export_on = false,    -- this module has turned the videobridge export on
		export_prev_async = nil, -- asyncTranscription before it did
		user_metadata = nil,  -- recording.isTranscribingEnabled as a client (or another module) last set it
	};
end

local function get_state(room)
	local state = rooms[room.jid];
	if state and state.room ~= room then
		-- a new room object under the same JID (destroyed and created again)
		state = nil;
	end
	if not state then
		if not valid_room_jid(room.jid) or room.jid:find("^__jicofo%-health%-check") then
			return nil;
		end
		local old = rooms[room.jid];
		state = new_state(room);
		if old and old.busy then
			-- the old room's last calls (EndRoom) go first
			state.after = old;
		end
		rooms[room.jid] = state;
	end
	return state;
end

local function wants(state, kind)
	return next(state.sources[kind]) ~= nil or state.pinned[kind] == true;
end

local function wants_any(state)
	return wants(state, "transcription") or wants(state, "captions");
end

local function copy_table(t)
	local c = {};
	if type(t) == "table" then
		for k, v in pairs(t) do c[k] = v; end
	end
	return c;
end

-- The videobridge export, the way Jicofo expects it. Jicofo opens the bridge's
-- WebSocket to jicofo.transcription.url-template only while the room metadata
-- has both asyncTranscription and recording.isTranscribingEnabled true
-- (jicofo ChatRoomImpl.doSetRoomMetadata -> transcribingEnabledChanged), and it
-- reads the metadata only from the room_metadata component's broadcast
-- (jicofo RoomMetadataHandler.kt), which that component sends on
-- "room-metadata-changed" (jitsi-meet mod_room_metadata_component.lua).
-- transcription.urlParams are appended to the URL by Jicofo
-- (TranscriptionConfig.processTranscriptionMetadata); "room" lets the sidecar
-- put the socket in this room at once. Clients cannot set asyncTranscription
-- or transcription (the component's blocked keys), so only servers do this.
-- Without this, a dial answered here brings the transcriber but no audio.
local function set_export(state, on)
	if not export_audio or state.destroyed or state.export_on == on then return; end
	local room = state.room;
	local md = type(room.jitsiMetadata) == "table" and room.jitsiMetadata or {};
	room.jitsiMetadata = md;
	local rec = copy_table(md.recording);
	if on then
		state.export_prev_async = md.asyncTranscription;
		md.asyncTranscription = true;
		rec.isTranscribingEnabled = true;
		local tr = copy_table(md.transcription);
		local params = copy_table(tr.urlParams);
		params.room = state.jid;
		tr.urlParams = params;
		md.transcription = tr;
	else
		rec.isTranscribingEnabled = false;
		if not async_transcription then
			md.asyncTranscription = state.export_prev_async;
		end
	end
	md.recording = rec;
	state.export_on = on;
	module:log("info", "%s the videobridge audio export of %q (room metadata)", on and "Turning on" or "Turning off",
		state.jid);
	state.writing_metadata = true;
	local ok, err = pcall(module.fire_event, module, "room-metadata-changed", { room = room });
	state.writing_metadata = false;
	if not ok then
		module:log("error", "room-metadata-changed for %q failed: %s", state.jid, tostring(err));
	end
end

local function update_engaged_gauge()
	local n = 0;
	for _, state in pairs(rooms) do
		if state.engaged then n = n + 1; end
	end
	engaged_gauge:with_labels():set(n);
end

-- The room settings this module wants on the sidecar, and a key to compare them.
local function desired_settings(state)
	local p = policy_of(state.room);
	local language, best = nil, -1;
	for _, person in pairs(state.people) do
		if person.requesting and person.lang and person.lang_seq > best then
			language, best = person.lang, person.lang_seq;
		end
	end
	language = language or p.language;
	local primary = primary_tag(language);
	local translations, seen = {}, {};
	local function add(lang)
		local key = lang:lower():gsub("_", "-");
		if not seen[key] and primary_tag(lang) ~= primary then
			seen[key] = true;
			t_insert(translations, lang);
		end
	end
	for _, lang in ipairs(p.translations or {}) do add(lang); end
	for _, person in pairs(state.people) do
		if person.requesting and person.tlang then add(person.tlang); end
	end
	t_sort(translations);
	local settings = {
		language = language,
		transcription_mode = p.explicit.transcription and MODES[p.transcription] or nil,
		captions_mode = p.explicit.captions and MODES[p.captions] or nil,
		trigger = p.explicit.trigger and TRIGGERS[p.trigger] or nil,
		interim_results = p.interim_results,
		translation_languages = #translations > 0 and translations or nil,
	};
	local key = t_concat({ tostring(language), tostring(settings.transcription_mode), tostring(settings.captions_mode),
		tostring(settings.trigger), tostring(p.interim_results), t_concat(translations, ",") }, "|");
	return settings, key, p;
end

local function participant_msg(person)
	return { id = person.id, name = person.name, avatar_url = person.avatar };
end

local function full_roster(state)
	local list = {};
	for _, person in pairs(state.people) do
		if valid_endpoint(person.id) then
			t_insert(list, participant_msg(person));
		end
	end
	t_sort(list, function (a, b) return a.id < b.id; end);
	return list;
end

--------------------------------------------------------------------------------
-- Dial replies
--------------------------------------------------------------------------------

local function refuse(origin, stanza, condition, text, outcome)
	count_dial(outcome or condition);
	local reply = st.error_reply(stanza, condition == "service-unavailable" and "wait"
		or (condition == "bad-request" or condition == "not-allowed") and "modify"
		or condition == "forbidden" and "auth" or "cancel", condition, text);
	if origin and origin.send and origin.type == "c2s" then
		origin.send(reply);
	else
		module:send(reply);
	end
end

local function answer_waiters(state, result)
	local waiters = state.waiters;
	if #waiters == 0 then return; end
	state.waiters = {};
	for _, w in ipairs(waiters) do
		if result.ok then
			count_dial("accepted");
			module:send(st.reply(w.stanza):tag("ref", { xmlns = RAYO, uri = "xmpp:" .. transcriber_jid }):up());
		else
			refuse(nil, w.stanza, "service-unavailable", result.text, result.outcome or "unavailable");
		end
	end
	if result.ok then
		state.dial_confirmed = true;
	elseif not state.dial_confirmed then
		-- a dial that failed leaves nothing behind for the health check to re-apply
		state.sources.transcription.dial, state.sources.captions.dial = nil, nil;
	end
end

local function failure_text(method, result)
	return ("captions service %s failed: %s %s"):format(method, tostring(result.status_name),
		tostring(result.status_message or "")):sub(1, 400);
end

--------------------------------------------------------------------------------
-- Reconcile: one call at a time per room, computed from the state when it is sent
--------------------------------------------------------------------------------

local reconcile;

-- The next call this room needs: { method, msg, done = function (result) -> continue? }
local function next_call(state)
	local room_name = state.jid;
	if state.engaged and not state.known and not next(state.uncertain) and not wants_any(state) then
		-- engaged for a start that failed before the sidecar heard of the room
		state.engaged, state.end_pending = false, false;
		update_engaged_gauge();
	end
	if state.end_pending then
		if not state.engaged then
			state.end_pending = false;
		else
			return {
				method = "EndRoom", msg = { room = room_name },
				done = function (result)
					if result.ok or result.status_name == "NOT_FOUND" then
						state.end_pending, state.engaged, state.known, state.uncertain = false, false, false, {};
						state.applied = { transcription = false, captions = false };
						state.roster_synced, state.settings_sent = false, nil;
						state.pending_upserts, state.pending_left = {}, {};
						update_engaged_gauge();
						return true;
					end
					return false;
				end,
			};
		end
	end
	if not state.engaged then
		if not wants_any(state) or state.destroyed then
			state.pending_upserts, state.pending_left = {}, {};
			return nil;
		end
		state.engaged = true;
		update_engaged_gauge();
	end

	local settings, key = desired_settings(state);
	if key ~= state.settings_sent and next(settings) == nil then
		-- nothing to set (an unset field cannot clear one on the sidecar)
		state.settings_sent = key;
	end
	if key ~= state.settings_sent then
		return {
			method = "UpdateSettings", msg = { room = room_name, settings = settings },
			done = function (result)
				if result.ok then
					state.settings_sent = key;
				elseif result.status_name == "INVALID_ARGUMENT" then
					-- e.g. a language the sidecar does not support: keep what it has
					module:log("warn", "Sidecar refused the settings of %q: %q", room_name, tostring(result.status_message));
					state.settings_sent = key;
				else
					return false;
				end
				return true;
			end,
		};
	end

	if not state.roster_synced or next(state.pending_upserts) or next(state.pending_left) then
		local msg = { room = room_name };
		if not state.roster_synced then
			msg.replace, msg.participants = true, full_roster(state);
		else
			msg.participants, msg.left = {}, {};
			for _, person in pairs(state.pending_upserts) do
				t_insert(msg.participants, participant_msg(person));
			end
			for id in pairs(state.pending_left) do
				t_insert(msg.left, id);
			end
			t_sort(msg.left);
		end
		state.pending_upserts, state.pending_left = {}, {};
		return {
			method = "UpdateRoster", msg = msg,
			done = function (result)
				if result.ok then
					state.roster_synced = true;
					return true;
				end
				state.roster_synced = false; -- the next pass sends the whole roster
				return false;
			end,
		};
	end

	for _, kind in ipairs(KINDS) do
		local want = wants(state, kind);
		if want and not state.applied[kind] then
			local sources = state.sources[kind];
			-- what started it; an automatic trigger keeps it on until the room ends
			local trigger = sources.auto and TRIGGERS[policy_of(state.room).trigger] or "TRIGGER_MANUAL";
			local meeting_id = state.room._data and state.room._data.meetingId;
			return {
				method = START_METHOD[kind],
				msg = {
					room = room_name, trigger = trigger,
					requested_by = state.requested_by or (sources.auto and "auto") or (sources.metadata and "metadata") or "",
					meeting_id = valid_meeting_id(meeting_id) and meeting_id or nil,
				},
				done = function (result)
					if result.ok then
						state.applied[kind], state.uncertain[kind] = true, nil;
					elseif result.status_name == "DEADLINE_EXCEEDED" then
						-- it may have started all the same: the health check looks
						state.uncertain[kind] = true;
					elseif result.status_name == "FAILED_PRECONDITION" or result.status_name == "INVALID_ARGUMENT" then
						-- disabled or misconfigured on the sidecar: retrying will not help
						module:log("warn", "Sidecar refused to start %s in %q: %q", kind, room_name,
							tostring(result.status_message));
						state.sources[kind], state.pinned[kind] = {}, nil;
					end
					if kind == "captions" then
						answer_waiters(state, result.ok and { ok = true } or {
							text = failure_text(START_METHOD[kind], result) });
					end
					return result.ok or result.status_name == "FAILED_PRECONDITION"
						or result.status_name == "INVALID_ARGUMENT";
				end,
			};
		elseif not want and state.applied[kind] then
			local reason = state.stop_reason[kind] or "STOP_REASON_USER";
			return {
				method = STOP_METHOD[kind], msg = { room = room_name, reason = reason },
				done = function (result)
					if result.ok or result.status_name == "NOT_FOUND" then
						state.applied[kind] = false;
						return true;
					elseif result.status_name == "FAILED_PRECONDITION" then
						-- an automatic trigger keeps it on until the room ends
						module:log("info", "Sidecar keeps %s on in %q: %q", kind, room_name, tostring(result.status_message));
						state.pinned[kind] = true;
						return true;
					end
					return false;
				end,
			};
		end
	end
	return nil;
end

local function pass_done(state)
	local waiting = state.then_run;
	if waiting then
		state.then_run = nil;
		reconcile(waiting);
	end
end

-- The export follows what the sidecar has on: off at once when nothing is
-- wanted any more, on once a start has been confirmed (so the bridge's socket
-- finds the room there).
local function sync_export(state)
	local on = state.engaged and wants_any(state) and (state.applied.captions or state.applied.transcription);
	set_export(state, on and true or false);
end

function reconcile(state)
	if not wants_any(state) then
		set_export(state, false);
	end
	if state.busy then
		state.dirty = true;
		return;
	end
	local before = state.after;
	if before then
		if before.busy then
			before.then_run = state;
			return;
		end
		state.after = nil;
	end
	state.busy, state.dirty = true, false;
	local function step()
		local call = next_call(state);
		if not call then
			state.busy, state.failed = false, false;
			sync_export(state);
			if #state.waiters > 0 then
				-- nothing left to start (the dialer left, the room ended...)
				answer_waiters(state, state.applied.captions and { ok = true }
					or { text = "captions were not started (the room ended or they were turned off)" });
			end
			if state.dirty then
				return reconcile(state);
			end
			if state.destroyed and rooms[state.jid] == state then
				rooms[state.jid] = nil;
				update_engaged_gauge();
			end
			return pass_done(state);
		end
		sidecar_call(call.method, call.msg, function (result)
			state.last_call_done = time_now();
			if result.ok and call.method ~= "EndRoom" then
				state.known = true;
			end
			local go_on = call.done(result);
			if go_on then
				return step();
			end
			module:log("warn", "%s for %q failed: %s %q", call.method, state.jid,
				tostring(result.status_name), tostring(result.status_message));
			state.busy, state.failed = false, true;
			sync_export(state);
			answer_waiters(state, { text = failure_text(call.method, result) });
			if not state.known and not next(state.uncertain) and not wants_any(state) then
				-- the sidecar never had this room: nothing to retry
				state.engaged, state.end_pending, state.failed = false, false, false;
				update_engaged_gauge();
			end
			if state.destroyed and not state.engaged and rooms[state.jid] == state then
				rooms[state.jid] = nil;
			end
			pass_done(state);
		end);
	end
	step();
end

--------------------------------------------------------------------------------
-- Sources of "on": requesters, triggers, metadata
--------------------------------------------------------------------------------

local function remove_source(state, source, reason)
	local changed = false;
	for _, kind in ipairs(KINDS) do
		if state.sources[kind][source] then
			state.sources[kind][source] = nil;
			if not next(state.sources[kind]) then
				state.stop_reason[kind] = reason;
			end
			changed = true;
		end
	end
	return changed;
end

-- Captions asked for by dial stay on while someone requests them: once a
-- requester has been seen, the last one turning requestingTranscription off
-- (or leaving) stops them, unless another source keeps them on.
local function check_requesters(state)
	if not (state.sources.captions.dial or state.sources.transcription.dial) then
		state.requested_seen = false;
		return false;
	end
	local n = 0;
	for _, person in pairs(state.people) do
		if person.requesting then n = n + 1; end
	end
	if n > 0 then
		state.requested_seen = true;
		return false;
	end
	if state.requested_seen then
		module:log("info", "Nobody requests captions in %q any more; stopping", state.jid);
		state.requested_seen, state.dial_confirmed = false, false;
		return remove_source(state, "dial", "STOP_REASON_NO_REQUESTERS");
	end
	return false;
end

-- Triggers and the metadata path, recomputed from the current room.
local function evaluate(state)
	if state.destroyed then return; end
	local p = policy_of(state.room);
	for _, kind in ipairs(KINDS) do
		local mode = p[kind];
		if mode == "disabled" then
			if next(state.sources[kind]) then
				state.sources[kind], state.stop_reason[kind] = {}, "STOP_REASON_USER";
			end
		elseif mode == "auto-on" and p.trigger ~= "manual" and state.count >= auto_need(p.trigger) then
			state.sources[kind].auto = true;
		end
	end
	-- recording.isTranscribingEnabled as a participant set it (the recording
	-- dialog's transcription switch, or the CC button with asyncTranscription):
	-- a transcript, and the captions that Jitsi shows from the same results
	local meta = state.user_metadata == true and state.count > 0;
	for _, kind in ipairs(KINDS) do
		local on = meta and p[kind] ~= "disabled";
		if on and not state.sources[kind].metadata then
			module:log("info", "Room metadata turns %s on in %q", kind, state.jid);
			state.sources[kind].metadata = true;
		elseif not on and state.sources[kind].metadata then
			module:log("info", "Room metadata turns %s off in %q", kind, state.jid);
			state.sources[kind].metadata = nil;
			if not next(state.sources[kind]) then
				state.stop_reason[kind] = "STOP_REASON_USER";
			end
		end
	end
end

-- The last participant left or the room is gone: everything stops (EndRoom).
local function end_session(state)
	state.sources = { transcription = {}, captions = {} };
	state.pinned, state.stop_reason = {}, {};
	state.requested_seen, state.dial_confirmed = false, false;
	if state.engaged then
		state.end_pending = true;
	end
end

--------------------------------------------------------------------------------
-- Occupants
--------------------------------------------------------------------------------

-- "service": focus, transcriber, hidden domain (never in the roster);
-- "uncounted": excluded domains (in the roster, not counted); "participant".
local function classify(occupant)
	local bare = occupant.bare_jid;
	local host = bare and jid_host(bare);
	if jid_resource(occupant.nick) == "focus" or bare == transcriber_jid or host == hidden_domain then
		return "service";
	elseif host and exclude_domains:contains(host) then
		return "uncounted";
	end
	return "participant";
end

local function update_occupant(state, occupant, presence)
	if classify(occupant) == "service" then return; end
	local nick = occupant.nick;
	local person = state.people[nick];
	local is_new = person == nil;
	if is_new then
		person = { id = jid_resource(nick), counted = classify(occupant) == "participant", lang_seq = 0 };
		state.people[nick] = person;
		if person.counted then state.count = state.count + 1; end
	end
	if not presence then
		presence = occupant:get_presence();
	end
	if presence then
		local name = clean_text(presence:get_child_text("nick", NICK_NS), 256);
		local avatar = clean_avatar(child_text(presence, "avatar-url"));
		if is_new or name ~= person.name or avatar ~= person.avatar then
			person.name, person.avatar = name, avatar;
			if valid_endpoint(person.id) then
				state.pending_upserts[person.id] = person;
				state.pending_left[person.id] = nil;
			elseif is_new then
				module:log("debug", "%q: endpoint id %q is not one the sidecar takes; not in the roster",
					state.jid, person.id);
			end
		end
		person.requesting = child_text(presence, P_REQUESTING) == "true";
		local lang = clean_language(child_text(presence, P_LANGUAGE));
		if lang ~= person.lang then
			person.lang, person.lang_seq = lang, next_seq();
		end
		person.tlang = clean_language(child_text(presence, P_TRANSLATION));
	end
	return is_new;
end

local function remove_occupant(state, nick)
	local person = state.people[nick];
	if not person then return; end
	state.people[nick] = nil;
	if person.counted then state.count = state.count - 1; end
	if valid_endpoint(person.id) then
		state.pending_upserts[person.id] = nil;
		state.pending_left[person.id] = true;
	end
end

local health_check_soon;

local function on_presence(event)
	local room, occupant, stanza = event.room, event.occupant, event.stanza;
	if not occupant or occupant.role == nil or (stanza and stanza.attr.type == "unavailable") then
		return;
	end
	local state = get_state(room);
	if not state then return; end
	update_occupant(state, occupant, stanza);
	check_requesters(state);
	evaluate(state);
	reconcile(state);
end

module:hook("muc-broadcast-presence", on_presence);

-- The transcriber gets into locked and members-only (lobby) rooms: it joins
-- as Jigasi did, for a meeting whose moderator asked for it. Priority 30: before
-- Prosody's password check (-20) and members-only check (-5), and before
-- jitsi-meet's lobby and password-whitelist modules, which do the same for the
-- domains in muc_lobby_whitelist / muc_password_whitelist.
module:hook("muc-occupant-pre-join", function (event)
	local room, stanza = event.room, event.stanza;
	if jid_bare(stanza.attr.from) ~= transcriber_jid then return; end
	if room:get_members_only() and not room:get_affiliation(transcriber_jid) then
		room:set_affiliation(true, transcriber_jid, "member");
	end
	local password = room:get_password();
	if password then
		local x = stanza:get_child("x", MUC_NS);
		if not x then
			stanza:tag("x", { xmlns = MUC_NS }):up();
			x = stanza:get_child("x", MUC_NS);
		end
		x:maptags(function (tag)
			if tag.name == "password" then return nil; end
			return tag;
		end);
		x:text_tag("password", password, { xmlns = MUC_NS });
	end
end, 30);
module:hook("muc-occupant-joined", on_presence);

module:hook("muc-occupant-left", function (event)
	local room, occupant = event.room, event.occupant;
	local state = rooms[room.jid];
	if not state or state.room ~= room or not occupant then return; end
	if occupant.bare_jid == transcriber_jid then
		if wants(state, "captions") and state.applied.captions and not state.end_pending then
			-- gone while it should be here: the sidecar may have crashed
			module:log("info", "The transcriber left %q while captions are on; checking the sidecar", room.jid);
			health_check_soon();
		end
		return;
	end
	remove_occupant(state, event.nick or occupant.nick);
	check_requesters(state);
	if state.count <= 0 then
		end_session(state);
	end
	evaluate(state);
	reconcile(state);
end);

--------------------------------------------------------------------------------
-- Rooms and metadata
--------------------------------------------------------------------------------

module:hook("muc-room-created", function (event)
	local room = event.room;
	local state = get_state(room);
	if not state then return; end
	if async_transcription then
		-- The videobridge path: with asyncTranscription the CC button asks for
		-- transcription through the metadata (recording.isTranscribingEnabled),
		-- which Jicofo turns into an export to the sidecar.
		room.jitsiMetadata = room.jitsiMetadata or {};
		room.jitsiMetadata.asyncTranscription = true;
		module:fire_event("room-metadata-changed", { room = room });
	end
end);

module:hook("muc-room-destroyed", function (event)
	local room = event.room;
	local state = rooms[room.jid];
	if not state or state.room ~= room then return; end
	state.destroyed = true;
	end_session(state);
	reconcile(state);
end);

-- recording.isTranscribingEnabled changed by someone else than this module:
-- on asks for a transcript (and captions); off turns off what a dial or the
-- metadata turned on (Jicofo closes the export then, so captions could not go on)
local function metadata_intent(state, on)
	if state.user_metadata == on then return; end
	state.user_metadata = on;
	if not on then
		remove_source(state, "dial", "STOP_REASON_USER");
		state.requested_seen, state.dial_confirmed = false, false;
	end
end

local function on_metadata(event)
	local room = event.room;
	if not room then return; end
	local state = get_state(room);
	if not state or state.writing_metadata then return; end
	local on = metadata_transcribing(room);
	if event.key ~= nil or event.actor ~= nil then
		-- a client's update through the room_metadata component
		if event.key == "recording" then
			metadata_intent(state, on);
		end
	elseif on ~= state.export_on then
		-- another module changed the metadata: an isTranscribingEnabled that is
		-- not what this module last wrote is someone's intent
		metadata_intent(state, on);
	end
	evaluate(state);
	reconcile(state);
end
-- internal changes (other modules) and client updates through mod_room_metadata_component
module:hook("room-metadata-changed", on_metadata);
module:hook("jitsi-metadata-updated", on_metadata);

--------------------------------------------------------------------------------
-- The dial IQ
--------------------------------------------------------------------------------

-- As jitsi-meet's util.lib.lua is_feature_allowed(ft, features, granted_features,
-- is_moderator): a token's features table decides when there is one (a missing
-- key is a no), else the features granted to the session, else the role.
local function transcription_allowed(origin, occupant)
	local function yes(v) return v == true or v == "true"; end
	local features = origin and origin.jitsi_meet_context_features;
	if type(features) == "table" then
		return yes(features.transcription), "your token does not allow transcription";
	end
	local granted = origin and origin.granted_jitsi_meet_context_features;
	if type(granted) == "table" then
		return yes(granted.transcription), "transcription is not granted to you";
	end
	return occupant.role == "moderator", "only moderators can start transcription";
end

local function pattern_escape(s)
	return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"));
end

-- JvbRoomName is the client-side JID; in multi-tenant deployments
-- room@conference.TENANT.BASE stands for [TENANT]room@conference.BASE here
-- (jitsi-meet mod_filter_iq_rayo compares it through room_jid_match_rewrite).
local tenant_host_pattern = "^" .. pattern_escape(mapper_prefix) .. "%.(.+)%." .. pattern_escape(mapper_base) .. "$";
local function internal_room_jid(room_jid)
	local node, host = jid_split(room_jid);
	if not node or host == module.host then return room_jid; end
	local tenant = host:match(tenant_host_pattern);
	if tenant and module.host == mapper_prefix .. "." .. mapper_base and not node:find("^%[") then
		return "[" .. tenant .. "]" .. node .. "@" .. module.host;
	end
	return room_jid;
end

local function transcriber_in(room)
	for _, occupant in room:each_occupant() do
		if occupant.bare_jid == transcriber_jid then
			return true;
		end
	end
	return false;
end

local function handle_dial(origin, stanza, dial, room_jid)
	local from = stanza.attr.from;
	local room = muc.get_room_from_jid(room_jid);
	if not room then
		return refuse(origin, stanza, "item-not-found", "no such room", "not_found");
	end

	local room_name, count = nil, 0;
	for header in dial:childtags("header", RAYO) do
		if header.attr.name == "JvbRoomName" then
			count = count + 1;
			room_name = header.attr.value;
		end
	end
	if count ~= 1 or type(room_name) ~= "string" or #room_name > 1024 then
		return refuse(origin, stanza, "bad-request", "the dial needs exactly one JvbRoomName header", "bad_request");
	end
	local named = jid_prep(room_name);
	if not named or jid_resource(named) or not jid_split(named) then
		module:log("info", "Dial from %q with a JvbRoomName that is not a room: %q", tostring(from), room_name);
		return refuse(origin, stanza, "bad-request", "JvbRoomName is not a room JID", "bad_request");
	end

	local occupant = room:get_occupant_by_real_jid(from);
	if not occupant then
		return refuse(origin, stanza, "forbidden", "only occupants of the room can ask for transcription", "forbidden");
	end
	if internal_room_jid(named) ~= room.jid then
		module:log("warn", "Dial from %q in %q names another room: %q", tostring(from), room.jid, room_name);
		return refuse(origin, stanza, "forbidden", "JvbRoomName does not name your room", "forbidden");
	end
	local allowed, why = transcription_allowed(origin, occupant);
	if not allowed then
		return refuse(origin, stanza, "forbidden", why, "forbidden");
	end
	-- JvbRoomPassword (lib-jitsi-meet sends it for locked rooms) was what Jigasi
	-- joined with; the transcriber is let in server-side (muc-occupant-pre-join
	-- below), so the password is neither needed nor kept.

	local state = get_state(room);
	if not state then
		return refuse(origin, stanza, "bad-request", "this room cannot have captions", "bad_request");
	end
	local p = policy_of(room);
	if p.captions == "disabled" then
		return refuse(origin, stanza, "not-allowed", "captions are disabled in this room", "not_allowed");
	end
	if transcriber_in(room) then
		return refuse(origin, stanza, "conflict", "the transcriber is already in the room", "conflict");
	end

	module:log("info", "Transcription requested in %q by %q", room.jid, occupant.nick);
	state.requested_by = jid_resource(occupant.nick);
	-- a fresh Start even if we think the sidecar has it: the dialer gets an
	-- answer from the sidecar, not from our memory
	state.sources.captions.dial, state.applied.captions = true, false;
	if p.transcription ~= "disabled" then
		state.sources.transcription.dial, state.applied.transcription = true, false;
	end
	t_insert(state.waiters, { stanza = stanza });
	check_requesters(state);
	reconcile(state);
end

-- mod_muc routes iq/full to occupants at priority -2; the dial is addressed to
-- the focus occupant, so this runs first (priority 10) and answers it instead of
-- Jicofo, which has no Jigasi to forward it to. Other IQs pass through.
module:hook("iq/full", function (event)
	local stanza = event.stanza;
	if stanza.attr.type ~= "set" then return; end
	local dial = stanza:get_child("dial", RAYO);
	if not dial or dial.attr.to ~= TRANSCRIBE_TARGET then return; end -- SIP dial-outs go to Jicofo
	local node, host, resource = jid_split(stanza.attr.to);
	if resource ~= "focus" or not node then return; end
	handle_dial(event.origin, stanza, dial, node .. "@" .. host);
	return true;
end, 10);

--------------------------------------------------------------------------------
-- Health check: a restarted sidecar has forgotten our rooms
--------------------------------------------------------------------------------

local checking = false;
local orphan_ticks = 0;

local function reapply(state, why)
	module:log("info", "Re-applying %q on the sidecar: %s", state.jid, why);
	reapply_counter:with_labels():add(1);
	state.applied = { transcription = false, captions = false };
	state.roster_synced, state.settings_sent = false, nil;
	reconcile(state);
end

-- A room the sidecar serves for this host that this module has not engaged
-- and that has no participant here (Prosody restarted; the transcriber's
-- rejoin may even have created an empty room): end it, or its transcript and
-- "transcribing" state would outlive the meeting.
local function end_orphans(there)
	for name, status in pairs(there) do
		local known = rooms[name];
		if jid_host(name) == module.host and not (known and (known.engaged or known.busy or known.end_pending))
			and (status.transcribing or status.captioning) then
			local room = muc.get_room_from_jid(name);
			local participants = 0;
			if room then
				for _, occupant in room:each_occupant() do
					if classify(occupant) == "participant" then
						participants = participants + 1;
					end
				end
			end
			if participants == 0 then
				module:log("info", "Ending orphaned room %q on the sidecar", name);
				sidecar_call("EndRoom", { room = name }, function (result)
					if not result.ok then
						module:log("debug", "EndRoom %q failed: %s", name, tostring(result.status_name));
					end
				end);
			end
		end
	end
end

local function health_check()
	if checking then return; end
	local any = false;
	for _, state in pairs(rooms) do
		if state.engaged or state.failed or state.end_pending or next(state.uncertain) then
			any = true;
			break;
		end
	end
	-- with nothing engaged, still look now and then for rooms the sidecar
	-- serves for this host that no meeting here owns (after a Prosody restart)
	orphan_ticks = orphan_ticks + 1;
	if not any and orphan_ticks < 4 then return; end
	orphan_ticks = 0;
	checking = true;
	local asked_at = time_now();
	sidecar_call("ListRooms", {}, function (result)
		checking = false;
		if not result.ok then
			module:log("debug", "Health check: ListRooms failed: %s", tostring(result.status_name));
			return;
		end
		local there = {};
		for _, status in ipairs(result.response.rooms or {}) do
			there[(status.room or ""):lower()] = status;
		end
		end_orphans(there);
		for _, state in pairs(rooms) do
			if not state.busy then
				local status = there[state.jid:lower()];
				-- what the sidecar says an operator should act on (no audio from
				-- the videobridge, the transcriber's join refused), once per text
				local warning = status and status.warning or "";
				if warning ~= "" and warning ~= state.warned then
					module:log("warn", "Sidecar on %q: %s", state.jid, warning);
				end
				state.warned = warning ~= "" and warning or nil;
				-- an answer about the room as it was before this module's last call is stale
				local fresh = (state.last_call_done or 0) < asked_at;
				local was_uncertain, followed = {}, false;
				for _, kind in ipairs(KINDS) do
					if state.uncertain[kind] then
						was_uncertain[kind] = true;
						state.uncertain[kind] = nil;
						local on = status and (kind == "captions" and status.captioning or kind == "transcription"
							and status.transcribing);
						if on and not wants(state, kind) then
							-- a start that timed out did happen: undo it
							state.applied[kind], state.known, state.failed = true, true, true;
						end
					end
				end
				-- started or stopped through the sidecar's own API: follow it, so the
				-- export (audio) and the roster come with it
				for _, kind in ipairs(KINDS) do
					local on = status and (kind == "captions" and status.captioning or kind == "transcription"
						and status.transcribing) or false;
					if on and fresh and not was_uncertain[kind] and not wants(state, kind) and not state.end_pending
						and state.count > 0 then
						module:log("info", "%s in %q was started through the sidecar's API; following it", kind, state.jid);
						state.sources[kind].api, state.applied[kind], state.known = true, true, true;
						state.engaged, followed = true, true;
						update_engaged_gauge();
					elseif not on and fresh and state.sources[kind].api then
						state.sources[kind].api, state.applied[kind], followed = nil, false, true;
					end
				end
				if followed then
					-- roster, settings and the export follow
					reconcile(state);
				end
				if state.engaged and wants_any(state) then
					if not status then
						reapply(state, "the room is missing there");
					elseif (wants(state, "transcription") and state.applied.transcription and not status.transcribing)
						or (wants(state, "captions") and state.applied.captions and not status.captioning) then
						reapply(state, "the room is inactive there");
					elseif state.failed then
						reconcile(state);
					end
				elseif state.failed or state.end_pending then
					reconcile(state);
				end
			end
		end
	end);
end

local soon_timer;
function health_check_soon()
	if soon_timer then return; end
	soon_timer = module:add_timer(1, function ()
		soon_timer = nil;
		health_check();
	end);
end

if health_interval > 0 then
	module:add_timer(health_interval, function ()
		health_check();
		return health_interval;
	end);
end

--------------------------------------------------------------------------------
-- Rooms that exist already (module loaded or reloaded at run time)
--------------------------------------------------------------------------------

for room in muc.live_rooms() do
	local state = get_state(room);
	if state then
		for _, occupant in room:each_occupant() do
			update_occupant(state, occupant, nil);
		end
		state.pending_upserts = {};
	end
end

module:log("info", "Captions for %s through %s (transcriber %s, health check every %s s)", module.host, sidecar_url,
	transcriber_jid, health_interval);
