-- mod_test_room_metadata: a room-metadata component for the test Prosody.
--
-- Written for this project's tests from the behaviour of jitsi-meet's
-- resources/prosody-plugins/mod_room_metadata_component.lua (read 2026; no code
-- taken from it). Each rule below names what it follows there.
--
--   Component "metadata.localhost" "test_room_metadata"
--       muc_component = "conference.localhost"
--       muc_mapper_domain_base = "localhost"     -- the main VirtualHost
--       admins = { "focus@auth.localhost" }      -- who gets the jicofo view
--
-- Rules:
--  1. Advertised as a disco identity category "component", type
--     "room_metadata", name = this component's address, on the main virtual
--     host: the component fires "jitsi-add-identity" there and
--     mod_features_identity (here mod_test_features_identity) adds it. Jicofo
--     (XmppProvider.discoverComponents) and lib-jitsi-meet find it that way.
--  2. Every room of the MUC component has room.jitsiMetadata (a table),
--     created at muc-room-created with priority -1 (room_created).
--  3. The whole metadata goes out as
--       <message from=COMPONENT to=OCCUPANT><json-message
--         xmlns="http://jitsi.org/jitmeet" room=ROOM>{"type":"room_metadata",
--         "metadata":{...}}</json-message></message>
--     (no type attribute: a normal message; send_metadata). ROOM is the
--     client-side room JID (internal_room_jid_match_rewrite: [tenant]room@muc
--     -> room@conference.tenant.base).
--  4. Admins (usermanager.is_admin; Jicofo) get the metadata plus
--     "participants" (room._data.participants, when set), "moderators"
--     (room._data.moderators, an array, possibly empty) and
--     "audioTranslationRequests" (room._data) (send_metadata).
--  5. A newly joining occupant gets the metadata just before its own
--     self-presence (status 110) leaves the server, once per bare JID until
--     it leaves (filter_stanza, sent_initial_metadata, muc-occupant-left).
--     TURN services are not added (no external_services here). On Prosody
--     0.12 muc-room-created fires after the creator's join, so the creator
--     (the focus) gets no initial push: it hears the first broadcast.
--  6. "room-metadata-changed" on the MUC host (other modules changed
--     room.jitsiMetadata) broadcasts the metadata to every occupant.
--  7. A client updates one key with a message to the component:
--       <room_metadata xmlns="http://jitsi.org/jitmeet" room=ROOM>
--         {"key":..., "data":..., "type":"room_metadata"}</room_metadata>
--     Error stanzas are ignored; ROOM is mapped with room_jid_match_rewrite;
--     the sender must be an occupant (by real JID); the JSON must decode, key
--     must be a string and data present and not null; then
--     "jitsi-metadata-allow-moderation" is fired on the main virtual host
--     (false: refused, non-nil: allowed with that data, nil: moderators
--     only); blocked keys (room_metadata_blocked_keys, default list below)
--     are refused even for moderators. A changed value is stored, broadcast
--     to every occupant, and "jitsi-metadata-updated" {room, actor, key} is
--     fired on the MUC host (on_message).
--     Not done: jitsi-meet also requires session.jitsi_web_query_room, which
--     its BOSH/WebSocket endpoints set from ?room=; the test clients use c2s
--     TCP, so that check is off unless room_metadata_require_web_query_room.
--  8. Health-check rooms (__jicofo-health-check*) are left alone.

local array = require "util.array";
local filters = require "util.filters";
local jid = require "util.jid";
local json = require "util.json";
local st = require "util.stanza";
local usermanager = require "core.usermanager";

local JITMEET = "http://jitsi.org/jitmeet";
local MUC_USER = "http://jabber.org/protocol/muc#user";
local IDENTITY_TYPE = "room_metadata";

local muc_host = module:get_option_string("muc_component");
if not muc_host then
	module:log("error", "muc_component is not set: no MUC to serve");
	return;
end
local main_host = module:get_option_string("muc_mapper_domain_base", (muc_host:gsub("^[^.]+%.", "")));
local muc_prefix = module:get_option_string("muc_mapper_domain_prefix", "conference");
local require_web_query_room = module:get_option_boolean("room_metadata_require_web_query_room", false);
local blocked_keys = module:get_option_set("room_metadata_blocked_keys", {
	"allownersEnabled", "asyncTranscription", "audioTranslationRequests",
	"conferencePresetsServiceEnabled", "dialinEnabled", "moderators",
	"participants", "participantsSoftLimit", "services", "transcriberType",
	"transcription", "visitorsEnabled",
});

local muc_module; -- module:context(muc_host), once the MUC host is there

local function is_admin(bare)
	return usermanager.is_admin(bare, module.host);
end

local function is_healthcheck(room_jid)
	return room_jid:sub(1, #"__jicofo-health-check") == "__jicofo-health-check";
end

-- room@conference.tenant.base -> [tenant]room@conference.base (client -> internal)
local function to_internal(room_jid)
	local node, host, resource = jid.split(room_jid);
	local pattern = "^" .. muc_prefix:gsub("%p", "%%%0") .. "%.([^.]+)%." .. main_host:gsub("%p", "%%%0") .. "$";
	local tenant = host and host:match(pattern);
	if not tenant or not node then return room_jid; end
	return jid.join("[" .. tenant .. "]" .. node, muc_host, resource);
end

-- [tenant]room@conference.base -> room@conference.tenant.base (internal -> client)
local function to_client(room_jid)
	local node, host, resource = jid.split(room_jid);
	if host ~= muc_host or not node then return room_jid; end
	local tenant, name = node:match("^%[([^%]]+)%](.+)$");
	if not tenant then return room_jid; end
	return jid.join(name, muc_prefix .. "." .. tenant .. "." .. main_host, resource);
end

local function get_room(room_jid)
	local host = prosody.hosts[muc_host];
	local muc = host and host.modules.muc;
	return muc and muc.get_room_from_jid(room_jid);
end

local function deep_equal(a, b)
	if type(a) ~= "table" or type(b) ~= "table" then return a == b; end
	for k, v in pairs(a) do
		if not deep_equal(v, b[k]) then return false; end
	end
	for k in pairs(b) do
		if a[k] == nil then return false; end
	end
	return true;
end

local function shallow_copy(t)
	local out = {};
	for k, v in pairs(t or {}) do out[k] = v; end
	return out;
end

local function encode(metadata)
	local text, err = json.encode({ type = IDENTITY_TYPE, metadata = metadata });
	if not text then module:log("error", "cannot encode the metadata: %s", err); end
	return text;
end

-- rule 3 and 4
local function send_metadata(occupant, room, text)
	if is_admin(occupant.bare_jid) then
		local md = shallow_copy(room.jitsiMetadata);
		md.moderators = array():append(room._data.moderators or {}); -- [] when empty
		if room._data.participants then
			md.participants = array():append(room._data.participants);
		end
		md.audioTranslationRequests = room._data.audioTranslationRequests;
		text = encode(md);
	elseif not text then
		text = encode(room.jitsiMetadata or {});
	end
	if not text then return; end
	module:send(st.message({ from = module.host, to = occupant.jid })
		:tag("json-message", { xmlns = JITMEET, room = to_client(room.jid) }):text(text):up());
end

local function broadcast(room)
	local text = encode(room.jitsiMetadata or {});
	for _, occupant in room:each_occupant() do
		send_metadata(occupant, room, text);
	end
end

-- rule 7
local function on_message(event)
	local origin, stanza = event.origin, event.stanza;
	if stanza.attr.type == "error" then return; end
	if require_web_query_room and not (origin and origin.jitsi_web_query_room) then return false; end
	local el = stanza:get_child(IDENTITY_TYPE, JITMEET);
	if not el then return true; end
	local text = el:get_text();
	if not text or text == "" or not el.attr.room then return true; end
	local room = get_room(to_internal(el.attr.room));
	if not room then
		module:log("warn", "no room %s", el.attr.room);
		return false;
	end
	local from = stanza.attr.from;
	local occupant = room:get_occupant_by_real_jid(from);
	if not occupant then
		module:log("warn", "%s is not in %s", from, room.jid);
		return false;
	end
	local data, err = json.decode(text);
	if data == nil or type(data) ~= "table" then
		module:log("error", "invalid JSON from %s: %s", from, err);
		return false;
	end
	if type(data.key) ~= "string" then
		module:log("error", "key is not a string: %s", text);
		return true;
	end
	if data.data == nil or data.data == json.null then
		module:log("error", "no data: %s", text);
		return false;
	end
	local verdict = module:context(main_host):fire_event("jitsi-metadata-allow-moderation",
		{ room = room, actor = occupant, key = data.key, data = data.data, session = origin });
	if verdict == false then
		module:log("warn", "%s may not set %s in %s", from, data.key, room.jid);
		return false;
	elseif verdict ~= nil then
		data.data = verdict;
	elseif occupant.role ~= "moderator" then
		module:log("warn", "%s is not a moderator: may not set %s in %s", from, data.key, room.jid);
		return false;
	end
	if blocked_keys:contains(data.key) then
		module:log("warn", "%s tried to set the blocked key %q in %s", from, data.key, room.jid);
		return false;
	end
	room.jitsiMetadata = room.jitsiMetadata or {};
	if not deep_equal(room.jitsiMetadata[data.key], data.data) then
		room.jitsiMetadata[data.key] = data.data;
		module:log("info", "metadata key %q set by %s in %s", data.key, from, room.jid);
		broadcast(room);
		muc_module:fire_event("jitsi-metadata-updated", { room = room, actor = occupant, key = data.key });
	end
	return true;
end
module:hook("message/host", on_message);

-- rule 5
local function has_status(x, code)
	for status in x:childtags("status") do
		if status.attr.code == code then return true; end
	end
	return false;
end

local function filter_stanza(stanza)
	if stanza.name ~= "presence" or not stanza.attr.to or stanza.attr.type == "unavailable" then
		return stanza;
	end
	local x = stanza:get_child("x", MUC_USER);
	if not x or not has_status(x, "110") or not stanza.attr.from then return stanza; end
	local room = get_room(jid.bare(stanza.attr.from));
	if not room or not room.sent_initial_metadata or is_healthcheck(room.jid) then return stanza; end
	local bare_to = jid.bare(stanza.attr.to);
	if room.sent_initial_metadata[bare_to] then return stanza; end
	for _, occupant in room:each_occupant() do
		if occupant.bare_jid == bare_to then
			room.sent_initial_metadata[bare_to] = true;
			send_metadata(occupant, room, nil);
			break;
		end
	end
	return stanza;
end

local function filter_session(session)
	filters.add_filter(session, "stanzas/out", filter_stanza, -3);
end
filters.add_filter_hook(filter_session);
function module.unload()
	filters.remove_filter_hook(filter_session);
end

-- rules 2 and 6 on the MUC host
local function on_muc_host()
	muc_module = module:context(muc_host);
	muc_module:hook("muc-room-created", function (event)
		local room = event.room;
		if is_healthcheck(room.jid) then return; end
		room.jitsiMetadata = room.jitsiMetadata or {};
		room.sent_initial_metadata = {};
	end, -1);
	muc_module:hook("room-metadata-changed", function (event)
		module:log("info", "metadata of %s changed internally: broadcasting", event.room.jid);
		broadcast(event.room);
	end);
	muc_module:hook("muc-occupant-left", function (event)
		if event.room.sent_initial_metadata then
			event.room.sent_initial_metadata[jid.bare(event.occupant.jid)] = nil;
		end
	end);
	module:log("info", "room metadata for %s", muc_host);
end

local function when_host(name, callback)
	if prosody.hosts[name] then
		callback();
	else
		module:hook_global("host-activated", function (host)
			if host == name then callback(); end
		end);
	end
end
when_host(muc_host, on_muc_host);

-- rule 1: once the main host's modules are loaded
local function add_identity()
	module:context(main_host):fire_event("jitsi-add-identity", { name = IDENTITY_TYPE, host = module.host });
end
if prosody.start_time then
	add_identity();
else
	module:hook_global("server-started", add_identity);
end
