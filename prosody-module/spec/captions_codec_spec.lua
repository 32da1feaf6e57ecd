-- Specs of captions_codec.lib.lua. Debian's busted runs Lua 5.1 unless told:
--   cd prosody-module && busted --lua=lua5.4 spec
-- (or: lua5.4 /usr/bin/busted spec)

if _VERSION ~= "Lua 5.4" then
	error("run these specs under Lua 5.4: busted --lua=lua5.4 spec (this is " .. _VERSION .. ")");
end

local spec_dir = (debug.getinfo(1, "S").source:match("^@(.*)[/\\]")) or ".";
package.path = spec_dir .. "/../mod_captions/?.lib.lua;" .. package.path;
local codec = require("captions_codec");

local function hex(s)
	return (s:gsub(".", function (c) return string.format("%02x", c:byte()); end));
end

local function unhex(h)
	h = h:gsub("%s+", "");
	return (h:gsub("%x%x", function (x) return string.char(tonumber(x, 16)); end));
end

local function encode_hex(name, tbl)
	return hex(codec.encode(name, tbl));
end

-- Encode, expecting an error; returns its message.
local function encode_error(name, tbl)
	local ok, err = pcall(codec.encode, name, tbl);
	assert.is_false(ok, "expected an error");
	assert.is_string(err);
	return err;
end

-- Decode, expecting nil, err and no Lua error; returns err.
local function decode_error(name, bytes)
	local ok, t, err = pcall(codec.decode, name, bytes);
	assert.is_true(ok, "decode raised: " .. tostring(t));
	assert.is_nil(t);
	assert.is_string(err);
	return err;
end

local trailers_ok = codec.frame("grpc-status:0\r\ngrpc-message:\r\n", true);
local grpc_headers = { ["content-type"] = "application/grpc-web+proto" };

describe("captions_codec", function ()

	describe("varints", function ()
		local cases = {
			{ 0, "00" },
			{ 1, "01" },
			{ 127, "7f" },
			{ 128, "8001" },
			{ 300, "ac02" },
			{ 16383, "ff7f" },
			{ 16384, "808001" },
			{ 1 << 31, "8080808008" },
			{ 4294967295, "ffffffff0f" },
			{ 4294967296, "8080808010" },
			{ math.maxinteger, "ffffffffffffffff7f" },
			{ -1, "ffffffffffffffffff01" },
			{ math.mininteger, "80808080808080808001" },
		};
		for _, case in ipairs(cases) do
			it("encodes and decodes " .. tostring(case[1]), function ()
				local bytes = codec.wire.encode_varint(case[1]);
				assert.equal(case[2], hex(bytes));
				local value, nextpos = codec.wire.decode_varint(bytes .. "\42");
				assert.equal(case[1], value);
				assert.equal(#bytes + 1, nextpos);
			end);
		end

		it("decodes from a position", function ()
			assert.same({ 300, 5 }, { codec.wire.decode_varint(unhex("ffff ac02"), 3) });
		end);

		it("refuses truncated and over-long varints", function ()
			local v, err = codec.wire.decode_varint(unhex("ff80"));
			assert.is_nil(v);
			assert.matches("truncated varint", err);
			v, err = codec.wire.decode_varint(unhex("ffffffffffffffffffff01"));
			assert.is_nil(v);
			assert.matches("longer than 10 bytes", err);
			assert.is_nil((codec.wire.decode_varint("")));
		end);

		it("drops bits beyond 64 in a 10th byte, as protobuf does", function ()
			assert.equal(-1, (codec.wire.decode_varint(unhex("ffffffffffffffffff7f"))));
		end);

		it("carries 64-bit values in messages", function ()
			-- uint32 at its maximum, uint64 up to 2^63-1, int64 negative in 10 bytes
			assert.equal("28ffffffff0f", encode_hex("Settings", { max_speech_caption_ms = 4294967295 }));
			local status = codec.decode("RoomStatus", unhex("40 ffffffffffffffff7f"));
			assert.equal(math.maxinteger, status.captions_sent);
			status = codec.decode("RoomStatus", unhex("40 8080808010"));
			assert.equal(4294967296, status.captions_sent);
			assert.equal("50ffffffffffffffffff01", encode_hex("CaptionEvent", { start_time_ms = -1 }));
			assert.equal(-1, codec.decode("CaptionEvent", unhex("50ffffffffffffffffff01")).start_time_ms);
			-- a uint64 of 2^63 and more comes back as the negative integer of the same bits
			assert.equal(-1, codec.decode("RoomStatus", unhex("40ffffffffffffffffff01")).captions_sent);
			-- uint32 keeps the low 32 bits of a longer varint, as protobuf does
			assert.equal(1, codec.decode("RoomStatus", unhex("30 8180808010")).participants);
		end);
	end);

	describe("encoding", function ()
		it("writes fields in field-number order with proto3 defaults left out", function ()
			assert.equal("", encode_hex("StartRequest", {}));
			assert.equal("", encode_hex("StartRequest", {
				room = "", requested_by = "", trigger = "TRIGGER_UNSPECIFIED", meeting_id = "",
			}));
			assert.equal("0a017212001a01752002" .. "2a026d31", encode_hex("StartRequest", {
				meeting_id = "m1", trigger = "TRIGGER_AUTOMATIC", requested_by = "u", settings = {}, room = "r",
			}));
		end);

		it("encodes every Settings field", function ()
			assert.equal(
				"0a02656e" .. "1001" .. "1803" .. "2003" .. "28a846" .. "30bc05" .. "3801" .. "4205617a757265"
					.. "4a026465" .. "4a026672",
				encode_hex("Settings", {
					language = "en", transcription_mode = "MODE_DISABLED", captions_mode = "MODE_AUTO_ON",
					trigger = "TRIGGER_AUTOMATIC_2ND_PARTICIPANT", max_speech_caption_ms = 9000,
					silence_duration_ms = 700, interim_results = true, provider = "azure",
					translation_languages = { "de", "fr" },
				}));
		end);

		it("encodes enums from names or numbers", function ()
			assert.equal("2002", encode_hex("StartRequest", { trigger = 2 }));
			assert.equal("2002", encode_hex("StartRequest", { trigger = "TRIGGER_AUTOMATIC" }));
			assert.equal("1002", encode_hex("StopRequest", { reason = "STOP_REASON_NO_REQUESTERS" }));
			-- proto3 enums are open: a number this codec has no name for still goes
			assert.equal("2007", encode_hex("StartRequest", { trigger = 7 }));
			assert.equal(2, codec.enums.Trigger.TRIGGER_AUTOMATIC);
			assert.equal(3, codec.enums.Mode.MODE_AUTO_ON);
			assert.equal(1, codec.enums.StopReason.STOP_REASON_USER);
		end);

		it("accepts floats with an integral value for integer fields", function ()
			assert.equal("28a846", encode_hex("Settings", { max_speech_caption_ms = 9000.0 }));
		end);

		it("encodes repeated uint32 packed and repeated strings one by one", function ()
			assert.equal("0a0172" .. "120b0a0161220601ffffffff0f" .. "1801" .. "220178" .. "2200",
				encode_hex("UpdateRosterRequest", {
					room = "r", participants = { { id = "a", ssrcs = { 1, 4294967295 } } },
					replace = true, left = { "x", "" },
				}));
			-- an empty list is left out; an empty participant is still sent
			assert.equal("1200", encode_hex("UpdateRosterRequest", { participants = { {} }, left = {} }));
			assert.equal("", encode_hex("Participant", { ssrcs = {} }));
		end);

		it("encodes doubles as little-endian fixed64", function ()
			assert.equal("41000000000000e03f", encode_hex("CaptionEvent", { stability = 0.5 }));
			assert.equal("", encode_hex("CaptionEvent", { stability = 0.0 }));
			-- -0.0 is not the default (its sign bit is set), as in the reference implementation
			assert.equal("410000000000000080", encode_hex("CaptionEvent", { stability = -0.0 }));
			assert.equal("69000000000000f03f", encode_hex("CaptionEvent", { confidence = 1 }));
		end);

		it("encodes unicode strings as their UTF-8 bytes", function ()
			assert.equal("0a05636166c3a9", encode_hex("RoomRequest", { room = "café" }));
			assert.equal("0a09e4bc9ae8adb0e5aea4", encode_hex("RoomRequest", { room = "会議室" }));
		end);
	end);

	describe("presence", function ()
		it("leaves out unset optional fields and sends optional fields set to zero", function ()
			assert.equal("", encode_hex("Settings", {}));
			assert.equal("0a00", encode_hex("Settings", { language = "" }));
			assert.equal("1000", encode_hex("Settings", { transcription_mode = "MODE_UNSPECIFIED" }));
			assert.equal("2800", encode_hex("Settings", { max_speech_caption_ms = 0 }));
			assert.equal("3800", encode_hex("Settings", { interim_results = false }));
			assert.equal("4200", encode_hex("Settings", { provider = "" }));
		end);

		it("tells unset optional fields from fields set to zero on decode", function ()
			local s = codec.decode("Settings", "");
			assert.same({ translation_languages = {} }, s);
			s = codec.decode("Settings", unhex("0a00 1000 2800 3800"));
			assert.equal("", s.language);
			assert.equal("MODE_UNSPECIFIED", s.transcription_mode);
			assert.is_nil(s.captions_mode);
			assert.equal(0, s.max_speech_caption_ms);
			assert.is_nil(s.silence_duration_ms);
			assert.is_false(s.interim_results);
			assert.is_nil(s.provider);
		end);

		it("gives plain proto3 fields their defaults and absent messages nil", function ()
			assert.same({
				room = "", transcribing = false, captioning = false, transcript_id = "",
				participants = 0, active_speakers = 0, captions_sent = 0, trigger = "TRIGGER_UNSPECIFIED",
				warning = "", caption_carrier = "", transcript_error = "",
			}, codec.decode("RoomStatus", ""));
			assert.same({ rooms = {} }, codec.decode("ListRoomsResponse", ""));
		end);

		it("sends a message field set to an empty table", function ()
			assert.equal("1200", encode_hex("StartRequest", { settings = {} }));
			assert.same({ translation_languages = {} }, codec.decode("RoomStatus", unhex("2200")).effective);
		end);
	end);

	describe("round trips", function ()
		local full_settings = {
			language = "de", transcription_mode = "MODE_AVAILABLE", captions_mode = "MODE_AUTO_ON",
			trigger = "TRIGGER_AUTOMATIC", max_speech_caption_ms = 5000, silence_duration_ms = 2000,
			interim_results = false, provider = "whisper", translation_languages = { "en", "fr", "uk" },
		};
		local cases = {
			Settings = full_settings,
			StartRequest = {
				room = "lobby@conference.meet.example.com", settings = full_settings,
				requested_by = "abcd1234", trigger = "TRIGGER_MANUAL", meeting_id = "4f0c-11ee",
				room_password = "pässwörd",
			},
			StopRequest = { room = "r", reason = "STOP_REASON_USER" },
			UpdateSettingsRequest = { room = "r", settings = { captions_mode = "MODE_DISABLED", translation_languages = {} } },
			Participant = { id = "e1", name = "Zoë", avatar_url = "https://x/a.png", ssrcs = { 0, 128, 4294967295 } },
			UpdateRosterRequest = {
				room = "r",
				participants = {
					{ id = "e1", name = "A", avatar_url = "", ssrcs = { 7 } },
					{ id = "e2", name = "", avatar_url = "", ssrcs = {} },
				},
				replace = true, left = { "e3", "e4" },
			},
			RoomRequest = { room = "会議室@conference.example.com" },
			RoomStatus = {
				room = "r", transcribing = true, captioning = true, effective = full_settings,
				transcript_id = "t-1", participants = 3, active_speakers = 1, captions_sent = 1 << 40,
				warning = "no audio from the videobridge", caption_carrier = "muc",
				transcript_error = "No space left on device",
				trigger = "TRIGGER_AUTOMATIC_2ND_PARTICIPANT",
			},
			ListRoomsRequest = {},
			ListRoomsResponse = {
				rooms = {
					{ room = "a", transcribing = false, captioning = true, transcript_id = "", participants = 0,
						active_speakers = 0, captions_sent = 0, trigger = "TRIGGER_UNSPECIFIED",
						warning = "no audio", caption_carrier = "muc", transcript_error = "" },
					{ room = "b", transcribing = true, captioning = false, transcript_id = "x", participants = 9,
						active_speakers = 2, captions_sent = 12, trigger = "TRIGGER_MANUAL",
						warning = "", caption_carrier = "videobridge", transcript_error = "disk full",
						effective = { language = "auto", translation_languages = {} } },
				},
			},
			CaptionEvent = {
				room = "r", participant_id = "p", participant_name = "P", avatar_url = "", message_id = "m",
				text = "hello wörld", is_interim = true, stability = 0.875, language = "en",
				start_time_ms = 1700000000000, end_time_ms = -5, timestamp_ms = math.mininteger, confidence = -0.25,
			},
		};
		for _, name in ipairs(codec.message_names) do
			it("encodes and decodes " .. name, function ()
				local value = assert(cases[name], "no round-trip case for " .. name);
				local bytes = codec.encode(name, value);
				local back, err = codec.decode(name, bytes);
				assert.is_nil(err);
				assert.same(value, back);
				assert.equal(bytes, codec.encode(name, back));
			end);
		end
	end);

	describe("decoding", function ()
		it("decodes RoomStatus with a nested effective Settings", function ()
			local bytes = codec.encode("RoomStatus", {
				room = "r", captioning = true, effective = { language = "en", interim_results = true },
				participants = 2, captions_sent = 10, trigger = "TRIGGER_AUTOMATIC",
			});
			assert.same({
				room = "r", transcribing = false, captioning = true, transcript_id = "",
				effective = { language = "en", interim_results = true, translation_languages = {} },
				participants = 2, active_speakers = 0, captions_sent = 10, trigger = "TRIGGER_AUTOMATIC",
				warning = "", caption_carrier = "", transcript_error = "",
			}, codec.decode("RoomStatus", bytes));
		end);

		it("decodes packed and unpacked repeated uint32, mixed", function ()
			local packed = codec.decode("Participant", unhex("2206 01 ffffffff0f"));
			assert.same({ 1, 4294967295 }, packed.ssrcs);
			local unpacked = codec.decode("Participant", unhex("2001 20ffffffff0f"));
			assert.same({ 1, 4294967295 }, unpacked.ssrcs);
			local mixed = codec.decode("Participant", unhex("2005 2202 0607 2008"));
			assert.same({ 5, 6, 7, 8 }, mixed.ssrcs);
			assert.same({}, codec.decode("Participant", unhex("2200")).ssrcs);
		end);

		it("keeps the last value of a repeated scalar and merges a repeated message field", function ()
			local s = codec.decode("RoomStatus", unhex("0a0161 0a0162 2204 0a02656e 2204 4202617a"));
			assert.equal("b", s.room);
			assert.equal("en", s.effective.language);
			assert.equal("az", s.effective.provider);
		end);

		it("decodes enum numbers it has no name for as numbers", function ()
			assert.equal(9, codec.decode("RoomStatus", unhex("4809")).trigger);
			assert.equal(-1, codec.decode("RoomStatus", unhex("48ffffffffffffffffff01")).trigger);
		end);

		it("decodes ListRoomsResponse", function ()
			local bytes = codec.encode("ListRoomsResponse", { rooms = { { room = "a" }, {}, { room = "c" } } });
			local list = codec.decode("ListRoomsResponse", bytes);
			assert.equal(3, #list.rooms);
			assert.equal("a", list.rooms[1].room);
			assert.equal("", list.rooms[2].room);
			assert.equal("c", list.rooms[3].room);
		end);
	end);

	describe("unknown fields", function ()
		local known = codec.encode("RoomStatus", { room = "r", captioning = true, effective = { language = "en" } });
		local expected = codec.decode("RoomStatus", known);
		local unknowns = {
			varint = "a006 ffffffffffffffffff01",          -- field 100, wire type 0
			fixed64 = "a906 0102030405060708",             -- field 101, wire type 1
			len = "b206 03 616263",                        -- field 102, wire type 2
			fixed32 = "bd06 01020304",                     -- field 103, wire type 5
			group = "c306 0801 1203616263 1b 2005 1c c406", -- field 104, group with a nested group 3
			empty_len = "b206 00",
		};
		for kind, bytes in pairs(unknowns) do
			it("skips an unknown " .. kind .. " field anywhere", function ()
				local u = unhex(bytes);
				assert.same(expected, codec.decode("RoomStatus", u .. known));
				assert.same(expected, codec.decode("RoomStatus", known .. u));
				assert.same(expected, codec.decode("RoomStatus", unhex("0a0172") .. u .. known:sub(4)));
				-- inside the nested Settings too
				local nested = codec.encode("Settings", { language = "en" }) .. u;
				local with_nested = unhex("0a0172 1801") .. "\34" .. string.char(#nested) .. nested;
				assert.same(expected, codec.decode("RoomStatus", with_nested));
			end);
		end

		it("skips a known field that arrives with another wire type", function ()
			-- room (a string) as a varint, captioning (a bool) as fixed32
			assert.same(codec.decode("RoomStatus", ""), codec.decode("RoomStatus", unhex("0801 1d00000000")));
		end);

		it("refuses invalid wire types, field number 0 and broken groups", function ()
			assert.matches("invalid wire type 6", decode_error("RoomStatus", unhex("a60600")));
			assert.matches("invalid wire type 7", decode_error("RoomStatus", unhex("a70600")));
			assert.matches("invalid field number", decode_error("RoomStatus", unhex("0001")));
			assert.matches("unterminated group", decode_error("RoomStatus", unhex("c306 0801")));
			assert.matches("closed by end%-group", decode_error("RoomStatus", unhex("c306 cc06")));
			assert.matches("unexpected end%-group", decode_error("RoomStatus", unhex("c406")));
			assert.matches("truncated fixed64", decode_error("RoomStatus", unhex("a906 01020304")));
			assert.matches("truncated fixed32", decode_error("RoomStatus", unhex("bd06 0102")));
			assert.matches("nested too deeply", decode_error("RoomStatus", unhex(("c306"):rep(200))));
		end);
	end);

	describe("decoding garbage", function ()
		it("returns nil and a message for bad input", function ()
			assert.matches("RoomStatus: truncated varint", decode_error("RoomStatus", "\255"));
			assert.matches("RoomStatus.room: truncated", decode_error("RoomStatus", unhex("0a05 6162")));
			assert.matches("RoomStatus.effective", decode_error("RoomStatus", unhex("2205 0a0a")));
			assert.matches("not valid UTF%-8", decode_error("RoomStatus", unhex("0a02 c328")));
			assert.matches("truncated double", decode_error("CaptionEvent", unhex("41 0000")));
			assert.matches("Participant.ssrcs: truncated", decode_error("Participant", unhex("2203 01ff")));
			assert.matches("length", decode_error("RoomStatus", unhex("0a ffffffffffffffffff01")));
			assert.matches("expected a string", decode_error("RoomStatus", 42));
			assert.matches("unknown message type", decode_error("NoSuchMessage", ""));
			assert.matches("unknown message type", decode_error(nil, ""));
		end);

		it("never raises on random bytes or on any prefix of a valid message", function ()
			local valid = codec.encode("ListRoomsResponse", { rooms = {
				{ room = "a", effective = { language = "en", translation_languages = { "de" } }, captions_sent = 99 },
				{ room = "b", trigger = "TRIGGER_MANUAL" },
			} });
			for i = 0, #valid do
				local ok, t, err = pcall(codec.decode, "ListRoomsResponse", valid:sub(1, i));
				assert.is_true(ok);
				assert.is_true(t ~= nil or type(err) == "string");
			end
			local seed = 12345;
			local function rand(n) -- a small LCG, so the cases are the same on every run
				seed = (seed * 1103515245 + 12345) % 2147483648;
				return seed % n;
			end
			for _ = 1, 2000 do
				local parts = {};
				for j = 1, rand(40) do
					parts[j] = string.char(rand(256));
				end
				for _, name in ipairs({ "RoomStatus", "ListRoomsResponse", "CaptionEvent", "Participant" }) do
					local ok, t, err = pcall(codec.decode, name, table.concat(parts));
					assert.is_true(ok, tostring(t));
					assert.is_true(t ~= nil or type(err) == "string");
				end
			end
		end);
	end);

	describe("encoding errors", function ()
		it("names the field", function ()
			assert.matches("StartRequest%.room: expected a string, got integer 5", encode_error("StartRequest", { room = 5 }));
			assert.matches('StartRequest: unknown field "rooom"', encode_error("StartRequest", { rooom = "x" }));
			assert.matches("StartRequest: unknown field integer 1", encode_error("StartRequest", { "x" }));
			assert.matches("StartRequest%.settings%.language: expected a string",
				encode_error("StartRequest", { settings = { language = 1 } }));
			assert.matches('StartRequest%.settings: unknown field "lang"',
				encode_error("StartRequest", { settings = { lang = "en" } }));
			assert.matches('Settings%.trigger: unknown Trigger value "TRIGGER_BOGUS"',
				encode_error("Settings", { trigger = "TRIGGER_BOGUS" }));
			assert.matches("Settings%.captions_mode: expected a Mode name", encode_error("Settings", { captions_mode = true }));
			assert.matches("Settings%.interim_results: expected a boolean",
				encode_error("Settings", { interim_results = "yes" }));
			assert.matches("Settings%.max_speech_caption_ms: expected an integer",
				encode_error("Settings", { max_speech_caption_ms = 1.5 }));
			assert.matches("Settings%.max_speech_caption_ms: expected an integer",
				encode_error("Settings", { max_speech_caption_ms = "9000" }));
			assert.matches("Settings%.silence_duration_ms: %-1 is out of range for uint32",
				encode_error("Settings", { silence_duration_ms = -1 }));
			assert.matches("UpdateRosterRequest%.participants%[2%]%.ssrcs%[2%]: 4294967296 is out of range",
				encode_error("UpdateRosterRequest", { participants = { {}, { ssrcs = { 1, 4294967296 } } } }));
			assert.matches("UpdateRosterRequest%.participants%[1%]: expected a table",
				encode_error("UpdateRosterRequest", { participants = { "e1" } }));
			assert.matches("UpdateRosterRequest%.left: expected a list", encode_error("UpdateRosterRequest", { left = "a" }));
			assert.matches("UpdateRosterRequest%.left: list has holes",
				encode_error("UpdateRosterRequest", { left = { [1] = "a", [3] = "b" } }));
			assert.matches("UpdateRosterRequest%.left: expected a list, found key",
				encode_error("UpdateRosterRequest", { left = { x = "a" } }));
			assert.matches("UpdateRosterRequest%.replace: expected a boolean",
				encode_error("UpdateRosterRequest", { replace = 1 }));
			assert.matches("RoomRequest%.room: string is not valid UTF%-8", encode_error("RoomRequest", { room = "\255" }));
			assert.matches("RoomStatus%.captions_sent: %-1 is out of range", encode_error("RoomStatus", { captions_sent = -1 }));
			assert.matches("CaptionEvent%.stability: expected a number", encode_error("CaptionEvent", { stability = "1" }));
			assert.matches("StartRequest: expected a table", encode_error("StartRequest", "room"));
			assert.matches("unknown message type", encode_error("Nope", {}));
		end);

		it("points the error at the caller", function ()
			local ok, err = pcall(function ()
				local bytes = codec.encode("StartRequest", { room = 5 }); -- not a tail call
				return bytes;
			end);
			assert.is_false(ok);
			assert.matches("^[^:]*captions_codec_spec%.lua:%d+: captions_codec%.encode: ", err);
		end);
	end);

	describe("framing", function ()
		it("frames a message", function ()
			assert.equal("0000000000", hex(codec.frame("")));
			assert.equal("0000000003616263", hex(codec.frame("abc")));
			assert.equal("8000000003616263", hex(codec.frame("abc", true)));
			assert.equal("000000012c", hex(codec.frame(("x"):rep(300)):sub(1, 5)));
			assert.has_error(function () codec.frame(nil); end);
		end);
	end);

	describe("request", function ()
		it("builds the POST of a unary call", function ()
			local path, body, headers = codec.request("StartCaptions", "StartRequest",
				{ room = "r", trigger = "TRIGGER_MANUAL" }, { token = "s3cret", timeout = 5 });
			assert.equal("/captions.v1.Captions/StartCaptions", path);
			assert.equal(codec.frame(codec.encode("StartRequest", { room = "r", trigger = "TRIGGER_MANUAL" })), body);
			assert.same({
				["Content-Type"] = "application/grpc-web+proto",
				["Accept"] = "application/grpc-web+proto",
				["X-Grpc-Web"] = "1",
				["Authorization"] = "Bearer s3cret",
				["Grpc-Timeout"] = "5000m",
			}, headers);
		end);

		it("takes the method's request type when message_name is nil", function ()
			local path, body, headers = codec.request("ListRooms", nil, nil);
			assert.equal("/captions.v1.Captions/ListRooms", path);
			assert.equal("0000000000", hex(body));
			assert.is_nil(headers.Authorization);
			assert.is_nil(headers["Grpc-Timeout"]);
			local _, body2 = codec.request("EndRoom", nil, { room = "x" });
			assert.equal("00000000030a0178", hex(body2));
		end);

		it("knows every unary method of the API", function ()
			for method, types in pairs({
				StartTranscription = "StartRequest", StopTranscription = "StopRequest",
				StartCaptions = "StartRequest", StopCaptions = "StopRequest",
				UpdateSettings = "UpdateSettingsRequest", UpdateRoster = "UpdateRosterRequest",
				EndRoom = "RoomRequest", GetRoomStatus = "RoomRequest", ListRooms = "ListRoomsRequest",
			}) do
				assert.equal(types, codec.methods[method].request);
				assert.equal(method == "ListRooms" and "ListRoomsResponse" or "RoomStatus",
					codec.methods[method].response);
				assert.equal("/captions.v1.Captions/" .. method, (codec.request(method, types, {})));
			end
		end);

		it("refuses bad calls with a clear error", function ()
			assert.has_error(function () codec.request("Nope", nil, {}); end,
				nil);
			local ok, err = pcall(codec.request, "StartCaptions", "StopRequest", {});
			assert.is_false(ok);
			assert.matches("StartCaptions takes a StartRequest", err);
			ok, err = pcall(codec.request, "StartCaptions", nil, { room = 1 });
			assert.is_false(ok);
			assert.matches("StartRequest%.room: expected a string", err);
			ok, err = pcall(codec.request, "StartCaptions", nil, {}, { token = "a\r\nX-Evil: 1" });
			assert.is_false(ok);
			assert.matches("opts%.token must be a string without CR", err);
			ok, err = pcall(codec.request, "StartCaptions", nil, {}, { timeout = -1 });
			assert.is_false(ok);
			assert.matches("opts%.timeout", err);
			ok, err = pcall(codec.request, "StartCaptions", nil, {}, { timeout = 0 / 0 });
			assert.is_false(ok);
			assert.matches("opts%.timeout", err);
		end);

		it("formats grpc-timeout like the sidecar", function ()
			assert.equal("1m", codec.format_timeout(0));
			assert.equal("1m", codec.format_timeout(0.0001));
			assert.equal("1500m", codec.format_timeout(1.5));
			assert.equal("2m", codec.format_timeout(0.0011));
			assert.equal("99999999m", codec.format_timeout(99999.999));
			assert.equal("100000S", codec.format_timeout(100000));
			assert.equal("16666667M", codec.format_timeout(1e9));
			assert.equal("99999999H", codec.format_timeout(1e30));
			assert.equal("99999999H", codec.format_timeout(math.huge));
		end);
	end);

	describe("parse_response", function ()
		local room = codec.encode("RoomStatus", { room = "r", captioning = true });

		it("reads a data frame and an OK trailer frame", function ()
			local r = codec.parse_response(codec.frame(room) .. trailers_ok, grpc_headers);
			assert.same({
				ok = true, status = 0, status_name = "OK", status_message = "", message = room,
				trailers = { ["grpc-status"] = "0", ["grpc-message"] = "" },
			}, r);
			-- also with the HTTP status given and headers in any case
			r = codec.parse_response(codec.frame(room) .. trailers_ok,
				{ ["Content-Type"] = "application/grpc-web+proto" }, 200);
			assert.is_true(r.ok);
			assert.equal(room, r.message);
		end);

		it("reads an empty response message", function ()
			local r = codec.parse_response(codec.frame("") .. trailers_ok, grpc_headers);
			assert.is_true(r.ok);
			assert.equal("", r.message);
		end);

		it("reads an error status and percent-decodes its message", function ()
			local r = codec.parse_response(codec.frame(
				"grpc-status:5\r\ngrpc-message:no such room: caf%C3%A9 100%25\r\nx-room: r1\r\n", true), grpc_headers);
			assert.is_false(r.ok);
			assert.equal(5, r.status);
			assert.equal("NOT_FOUND", r.status_name);
			assert.equal("no such room: café 100%", r.status_message);
			assert.is_nil(r.message);
			assert.equal("r1", r.trailers["x-room"]);
		end);

		it("reads a trailers-only response from the headers", function ()
			local headers = {
				["content-type"] = "application/grpc-web+proto",
				["grpc-status"] = "16", ["grpc-message"] = "missing%20or%20wrong%20token",
			};
			for _, body in ipairs({ "", false }) do
				local r = codec.parse_response(body or nil, headers, 200);
				assert.same({
					ok = false, status = 16, status_name = "UNAUTHENTICATED",
					status_message = "missing or wrong token",
					trailers = { ["grpc-status"] = "16", ["grpc-message"] = "missing%20or%20wrong%20token" },
				}, r);
			end
			-- the sidecar sends the trailer frame as well; the frame is read first
			local r = codec.parse_response(codec.frame("grpc-status:16\r\ngrpc-message:nope\r\n", true), {
				["Grpc-Status"] = "16", ["Grpc-Message"] = "nope", ["Content-Type"] = "application/grpc-web+proto",
			});
			assert.equal(16, r.status);
			assert.equal("nope", r.status_message);
			-- no grpc-message at all
			r = codec.parse_response("", { ["grpc-status"] = "9" });
			assert.equal(9, r.status);
			assert.equal("FAILED_PRECONDITION", r.status_name);
			assert.equal("", r.status_message);
		end);

		it("leaves stray percent signs in grpc-message alone", function ()
			assert.equal("100% sure %zz %4", codec.percent_decode("100% sure %zz %4"));
			assert.equal("a\r\nb", codec.percent_decode("a%0d%0Ab"));
		end);

		it("accepts bare LF line ends and spaces in the trailer block", function ()
			local r = codec.parse_response(codec.frame(room) .. codec.frame("Grpc-Status: 0\ngrpc-message: \n", true));
			assert.is_true(r.ok);
		end);

		it("ignores a data frame sent with an error status", function ()
			local r = codec.parse_response(codec.frame(room) .. codec.frame("grpc-status:3\r\n", true));
			assert.is_false(r.ok);
			assert.equal(3, r.status);
			assert.is_nil(r.message);
		end);

		it("keeps an unknown status number", function ()
			local r = codec.parse_response(codec.frame("grpc-status:42\r\n", true));
			assert.equal(42, r.status);
			assert.equal("UNKNOWN", r.status_name);
		end);

		local malformed = {
			{ "a truncated frame header", "\0\0\0", "truncated frame header" },
			{ "a truncated payload", codec.frame(room):sub(1, -2), "truncated frame" },
			{ "a truncated trailer frame", codec.frame(room) .. trailers_ok:sub(1, -3), "truncated frame" },
			{ "a data frame without trailers", codec.frame(room), "no trailer frame" },
			{ "an empty body without a status header", "", "empty body and no grpc%-status" },
			{ "OK without a message", trailers_ok, "status OK without a response message" },
			{ "two messages", codec.frame(room) .. codec.frame(room) .. trailers_ok, "2 messages for a unary call" },
			{ "a frame after the trailers", trailers_ok .. codec.frame(room), "frame after the trailer frame" },
			{ "a compressed frame", "\1\0\0\0\0" .. trailers_ok, "compressed frame" },
			{ "unknown frame flags", "\64\0\0\0\0" .. trailers_ok, "unknown frame flags 0x40" },
			{ "a malformed grpc-status", codec.frame(room) .. codec.frame("grpc-status:abc\r\n", true),
				'malformed grpc%-status "abc"' },
			{ "trailers without grpc-status", codec.frame(room) .. codec.frame("x:y\r\n", true),
				"trailer frame without grpc%-status" },
		};
		for _, case in ipairs(malformed) do
			it("reports " .. case[1] .. " as INTERNAL", function ()
				local ok, r = pcall(codec.parse_response, case[2], grpc_headers, 200);
				assert.is_true(ok, tostring(r));
				assert.is_false(r.ok);
				assert.equal(13, r.status);
				assert.equal("INTERNAL", r.status_name);
				assert.is_nil(r.message);
				assert.matches(case[3], r.status_message);
			end);
		end

		it("refuses a body that is not gRPC-Web", function ()
			local r = codec.parse_response("<html>oops</html>", { ["content-type"] = "text/html" }, 200);
			assert.equal(13, r.status);
			assert.matches('unexpected content%-type "text/html"', r.status_message);
			r = codec.parse_response("AAAA", { ["content-type"] = "application/grpc-web-text+proto" }, 200);
			assert.equal(13, r.status);
			r = codec.parse_response({}, grpc_headers, 200);
			assert.equal(13, r.status);
			assert.matches("not a string", r.status_message);
			r = codec.parse_response(codec.frame(room) .. trailers_ok, { ["content-type"] = "application/grpc-web" }, 200);
			assert.is_true(r.ok);
		end);

		it("maps HTTP errors to gRPC codes", function ()
			local cases = {
				{ 0, "connection refused", 14, "HTTP request failed: connection refused" },
				{ 400, "", 13, "HTTP status 400" },
				{ 401, "", 16, "HTTP status 401" },
				{ 403, "", 7, "HTTP status 403" },
				{ 404, "404: Not Found", 12, "HTTP status 404: 404: Not Found" },
				{ 415, "unsupported content-type\n", 2, "HTTP status 415: unsupported content%-type" },
				{ 429, "", 14, "HTTP status 429" },
				{ 500, "", 2, "HTTP status 500" },
				{ 502, "<h1>Bad\1Gateway</h1>", 14, "HTTP status 502: <h1>Bad%?Gateway</h1>" },
				{ 503, nil, 14, "HTTP status 503" },
				{ 504, "", 14, "HTTP status 504" },
			};
			for _, case in ipairs(cases) do
				local r = codec.parse_response(case[2], { ["content-type"] = "text/plain" }, case[1]);
				assert.is_false(r.ok);
				assert.equal(case[3], r.status, case[1]);
				assert.matches(case[4], r.status_message);
			end
			-- a gRPC status in the headers of an HTTP error wins
			local r = codec.parse_response("", { ["grpc-status"] = "8", ["grpc-message"] = "too%20many" }, 500);
			assert.equal(8, r.status);
			assert.equal("too many", r.status_message);
			r = codec.parse_response("", { ["grpc-status"] = "0" }, 500);
			assert.equal(2, r.status);
			r = codec.parse_response("", { ["grpc-status"] = "x" }, 500);
			assert.equal(13, r.status);
		end);

		it("never raises", function ()
			local inputs = {
				{}, { nil, nil, 200 }, { "", 42 }, { "\128", "x", "200" }, { true, {}, 200 },
				{ "", { ["grpc-status"] = { "0", "0" } } }, { "", { [1] = "x" } },
				{ trailers_ok, nil, "not a number" },
			};
			for _, args in ipairs(inputs) do
				local ok, r = pcall(codec.parse_response, args[1], args[2], args[3]);
				assert.is_true(ok, tostring(r));
				assert.is_table(r);
				assert.is_boolean(r.ok);
				assert.is_number(r.status);
				assert.is_string(r.status_message);
			end
		end);
	end);

	describe("decode_response", function ()
		it("decodes the response message of the method", function ()
			local bytes = codec.encode("RoomStatus", { room = "r", captioning = true });
			local r = codec.decode_response("StartCaptions", codec.frame(bytes) .. trailers_ok, grpc_headers, 200);
			assert.is_true(r.ok);
			assert.equal("r", r.response.room);
			assert.is_true(r.response.captioning);
			r = codec.decode_response("ListRooms", codec.frame(codec.encode("ListRoomsResponse",
				{ rooms = { { room = "a" } } })) .. trailers_ok, grpc_headers, 200);
			assert.equal("a", r.response.rooms[1].room);
		end);

		it("reports a response that does not decode as INTERNAL", function ()
			local r = codec.decode_response("GetRoomStatus", codec.frame("\255") .. trailers_ok, grpc_headers, 200);
			assert.is_false(r.ok);
			assert.equal(13, r.status);
			assert.matches("malformed RoomStatus", r.status_message);
			assert.is_nil(r.response);
		end);

		it("passes errors through without a response", function ()
			local r = codec.decode_response("EndRoom", "", { ["grpc-status"] = "5", ["grpc-message"] = "gone" }, 200);
			assert.equal(5, r.status);
			assert.is_nil(r.response);
			r = codec.decode_response("Nope", "", {}, 200);
			assert.equal(13, r.status);
			assert.matches("unknown method", r.status_message);
		end);
	end);

	describe("status codes", function ()
		it("has every gRPC code both ways", function ()
			local names = { "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
				"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
				"OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED" };
			for code, name in ipairs(names) do
				assert.equal(code - 1, codec.status[name]);
				assert.equal(name, codec.status_names[code - 1]);
			end
		end);
	end);
end);
