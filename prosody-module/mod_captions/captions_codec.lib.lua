-- Protobuf and gRPC-Web codec for the captions sidecar's control API
-- (protos/captions/v1/captions.proto), in pure Lua 5.4.
--
-- Loaded by mod_captions with module:require("captions_codec"); it needs no
-- Prosody API and no C module, so the busted specs load it with plain require.
--
--   local codec = module:require("captions_codec")
--   local path, body, headers = codec.request("StartCaptions", "StartRequest",
--       { room = "room@conference.example.com", trigger = "TRIGGER_MANUAL" },
--       { token = secret, timeout = 5 })
--   http.request(base_url .. path, { method = "POST", body = body, headers = headers },
--       function (response_body, code, response)
--           local result = codec.decode_response("StartCaptions",
--               response_body, response and response.headers, code)
--           -- result.ok, result.status, result.status_name, result.status_message,
--           -- result.response (the decoded RoomStatus when ok)
--       end)
--
-- Lua representation of messages:
--   * a message is a table keyed by the proto field names;
--   * string and bytes fields are Lua strings (strings must be valid UTF-8);
--   * integer fields are Lua integers (floats with an integral value are
--     accepted on encode); uint64 values of 2^63 and above do not fit a Lua
--     integer and decode as negative numbers (the same 64 bits);
--   * enums are their value names as strings ("MODE_AUTO_ON"); encode also
--     takes the number, decode gives the number for values unknown to this
--     codec (proto3 enums are open);
--   * repeated fields are sequences ({ "en", "de" });
--   * presence: on decode, fields declared `optional` and message fields are
--     nil when absent from the wire, every other field gets its proto3
--     default ("" / 0 / false / the enum's zero name / {}); on encode, nil
--     leaves any field out, an `optional` field that is set is always sent
--     (even 0, "" or false) and a plain proto3 field is left out when it holds
--     its default, exactly as the reference implementations do.

if not string.pack then
	error("captions_codec needs Lua 5.3 or later (string.pack)");
end

local byte, char, sub, format = string.byte, string.char, string.sub, string.format;
local string_pack, string_unpack = string.pack, string.unpack;
local concat, unpack, sort = table.concat, table.unpack, table.sort;
local math_type, tointeger, maxinteger = math.type, math.tointeger, math.maxinteger;
local math_ceil, huge = math.ceil, math.huge;
local utf8_len = utf8.len;
local pairs, ipairs, type, tostring, tonumber = pairs, ipairs, type, tostring, tonumber;
local error, pcall, setmetatable, getmetatable = error, pcall, setmetatable, getmetatable;

local M = {};

M.PACKAGE = "captions.v1";
M.SERVICE = "captions.v1.Captions";
M.CONTENT_TYPE = "application/grpc-web+proto";

-- Nested messages deeper than this are refused on decode (upb's default).
local MAX_DEPTH = 100;

-- Wire types.
local WT_VARINT, WT_FIXED64, WT_LEN, WT_START_GROUP, WT_END_GROUP, WT_FIXED32 = 0, 1, 2, 3, 4, 5;

--------------------------------------------------------------------------------
-- Errors. Both directions raise a tagged table internally; the public
-- functions turn it into a string error (encode) or nil, err (decode).
--------------------------------------------------------------------------------

local codec_error_mt = { __tostring = function (e) return e.msg; end };

local function fail(msg)
	error(setmetatable({ msg = msg }, codec_error_mt), 0);
end

local function error_text(err)
	if getmetatable(err) == codec_error_mt then
		return err.msg, true;
	end
	return tostring(err), false;
end

--------------------------------------------------------------------------------
-- Varints
--------------------------------------------------------------------------------

-- A Lua integer as a varint of its 64 bits (negative numbers take 10 bytes,
-- as protobuf encodes negative int32/int64). Lua's >> is a logical shift.
local function encode_varint(n)
	if n >= 0 and n < 0x80 then
		return char(n);
	end
	local out, i = {}, 0;
	repeat
		local b = n & 0x7f;
		n = n >> 7;
		i = i + 1;
		out[i] = n ~= 0 and (b | 0x80) or b;
	until n == 0;
	return char(unpack(out, 1, i));
end

-- The varint at s[pos], not reading past limit: value, next position. Bits
-- beyond the 64th (in a 10th byte) are dropped, as protobuf does.
local function read_varint(s, pos, limit)
	local result, shift = 0, 0;
	for _ = 1, 10 do
		if pos > limit then
			fail(format("truncated varint at byte %d", pos));
		end
		local b = byte(s, pos);
		pos = pos + 1;
		result = result | ((b & 0x7f) << shift);
		if b < 0x80 then
			return result, pos;
		end
		shift = shift + 7;
	end
	fail(format("varint longer than 10 bytes at byte %d", pos - 10));
end

--------------------------------------------------------------------------------
-- Schema
--------------------------------------------------------------------------------

local enums = {};       -- name -> { VALUE_NAME = number }
local enum_names = {};  -- name -> { [number] = "VALUE_NAME" }

local function define_enum(name, values)
	local by_name, by_number = {}, {};
	for _, v in ipairs(values) do
		by_name[v[1]] = v[2];
		by_number[v[2]] = v[1];
	end
	enums[name], enum_names[name] = by_name, by_number;
end

define_enum("Mode", {
	{ "MODE_UNSPECIFIED", 0 }, { "MODE_DISABLED", 1 }, { "MODE_AVAILABLE", 2 }, { "MODE_AUTO_ON", 3 },
});
define_enum("Trigger", {
	{ "TRIGGER_UNSPECIFIED", 0 }, { "TRIGGER_MANUAL", 1 }, { "TRIGGER_AUTOMATIC", 2 },
	{ "TRIGGER_AUTOMATIC_2ND_PARTICIPANT", 3 },
});
define_enum("StopReason", {
	{ "STOP_REASON_UNSPECIFIED", 0 }, { "STOP_REASON_USER", 1 }, { "STOP_REASON_NO_REQUESTERS", 2 },
});

-- Scalar types: wire type, whether a repeated field of it is packed in proto3.
local scalar_wire = {
	string = WT_LEN, bytes = WT_LEN, bool = WT_VARINT,
	uint32 = WT_VARINT, uint64 = WT_VARINT, int64 = WT_VARINT, enum = WT_VARINT,
	double = WT_FIXED64, message = WT_LEN,
};
local packable = { bool = true, uint32 = true, uint64 = true, int64 = true, enum = true, double = true };

local messages = {};

-- fields: { number, name, type, label ("optional" | "repeated" | nil), ref }
-- where ref names the enum or message type.
local function define_message(name, field_list)
	local schema = { name = name, fields = {}, by_name = {}, by_number = {} };
	for _, f in ipairs(field_list) do
		local field = {
			number = f[1], name = f[2], type = f[3],
			optional = f[4] == "optional", repeated = f[4] == "repeated", ref = f[5],
		};
		field.wire = scalar_wire[field.type];
		field.packed = field.repeated and packable[field.type] or false;
		field.tag = encode_varint((field.number << 3) | (field.packed and WT_LEN or field.wire));
		schema.fields[#schema.fields + 1] = field;
		schema.by_name[field.name] = field;
		schema.by_number[field.number] = field;
	end
	sort(schema.fields, function (a, b) return a.number < b.number; end);
	messages[name] = schema;
end

define_message("Settings", {
	{ 1, "language", "string", "optional" },
	{ 2, "transcription_mode", "enum", "optional", "Mode" },
	{ 3, "captions_mode", "enum", "optional", "Mode" },
	{ 4, "trigger", "enum", "optional", "Trigger" },
	{ 5, "max_speech_caption_ms", "uint32", "optional" },
	{ 6, "silence_duration_ms", "uint32", "optional" },
	{ 7, "interim_results", "bool", "optional" },
	{ 8, "provider", "string", "optional" },
	{ 9, "translation_languages", "string", "repeated" },
});
define_message("StartRequest", {
	{ 1, "room", "string" },
	{ 2, "settings", "message", nil, "Settings" },
	{ 3, "requested_by", "string" },
	{ 4, "trigger", "enum", nil, "Trigger" },
	{ 5, "meeting_id", "string" },
	{ 6, "room_password", "string" },
});
define_message("StopRequest", {
	{ 1, "room", "string" },
	{ 2, "reason", "enum", nil, "StopReason" },
});
define_message("UpdateSettingsRequest", {
	{ 1, "room", "string" },
	{ 2, "settings", "message", nil, "Settings" },
});
define_message("Participant", {
	{ 1, "id", "string" },
	{ 2, "name", "string" },
	{ 3, "avatar_url", "string" },
	{ 4, "ssrcs", "uint32", "repeated" },
});
define_message("UpdateRosterRequest", {
	{ 1, "room", "string" },
	{ 2, "participants", "message", "repeated", "Participant" },
	{ 3, "replace", "bool" },
	{ 4, "left", "string", "repeated" },
});
define_message("RoomRequest", {
	{ 1, "room", "string" },
});
define_message("RoomStatus", {
	{ 1, "room", "string" },
	{ 2, "transcribing", "bool" },
	{ 3, "captioning", "bool" },
	{ 4, "effective", "message", nil, "Settings" },
	{ 5, "transcript_id", "string" },
	{ 6, "participants", "uint32" },
	{ 7, "active_speakers", "uint32" },
	{ 8, "captions_sent", "uint64" },
	{ 9, "trigger", "enum", nil, "Trigger" },
	{ 10, "warning", "string" },
	{ 11, "caption_carrier", "string" },
	{ 12, "transcript_error", "string" },
});
define_message("ListRoomsRequest", {});
define_message("ListRoomsResponse", {
	{ 1, "rooms", "message", "repeated", "RoomStatus" },
});
-- The live caption event of SubscribeCaptions (int64 and double fields).
define_message("CaptionEvent", {
	{ 1, "room", "string" },
	{ 2, "participant_id", "string" },
	{ 3, "participant_name", "string" },
	{ 4, "avatar_url", "string" },
	{ 5, "message_id", "string" },
	{ 6, "text", "string" },
	{ 7, "is_interim", "bool" },
	{ 8, "stability", "double" },
	{ 9, "language", "string" },
	{ 10, "start_time_ms", "int64" },
	{ 11, "end_time_ms", "int64" },
	{ 12, "timestamp_ms", "int64" },
	{ 13, "confidence", "double" },
});

for _, schema in pairs(messages) do
	for _, field in ipairs(schema.fields) do
		if field.type == "message" then
			field.schema = assert(messages[field.ref], field.ref);
		elseif field.type == "enum" then
			field.values = assert(enums[field.ref], field.ref);
			field.names = enum_names[field.ref];
		end
	end
end

-- The unary methods, with their request and response messages.
local methods = {
	StartTranscription = { request = "StartRequest", response = "RoomStatus" },
	StopTranscription = { request = "StopRequest", response = "RoomStatus" },
	StartCaptions = { request = "StartRequest", response = "RoomStatus" },
	StopCaptions = { request = "StopRequest", response = "RoomStatus" },
	UpdateSettings = { request = "UpdateSettingsRequest", response = "RoomStatus" },
	UpdateRoster = { request = "UpdateRosterRequest", response = "RoomStatus" },
	EndRoom = { request = "RoomRequest", response = "RoomStatus" },
	GetRoomStatus = { request = "RoomRequest", response = "RoomStatus" },
	ListRooms = { request = "ListRoomsRequest", response = "ListRoomsResponse" },
};

--------------------------------------------------------------------------------
-- Encoding
--------------------------------------------------------------------------------

local function describe(v)
	local t = type(v);
	if t == "number" then
		return format("%s %s", math_type(v), tostring(v));
	elseif t == "string" then
		return format("string %q", #v > 40 and sub(v, 1, 40) .. "..." or v);
	end
	return t;
end

local int_range = {
	uint32 = { 0, 0xFFFFFFFF },
	uint64 = { 0, maxinteger },
	int64 = { nil, nil },
};

local function check_integer(v, ftype, path)
	local n = v;
	if math_type(v) == "float" then
		n = tointeger(v);
		if n == nil then
			fail(format("%s: expected an integer (%s), got %s", path, ftype, describe(v)));
		end
	elseif math_type(v) ~= "integer" then
		fail(format("%s: expected an integer (%s), got %s", path, ftype, describe(v)));
	end
	local range = int_range[ftype];
	if range[1] and (n < range[1] or n > range[2]) then
		fail(format("%s: %d is out of range for %s (%d..%d)", path, n, ftype, range[1], range[2]));
	end
	return n;
end

local function check_string(v, path)
	if type(v) ~= "string" then
		fail(format("%s: expected a string, got %s", path, describe(v)));
	end
	if not utf8_len(v) then
		fail(format("%s: string is not valid UTF-8", path));
	end
	return v;
end

local function enum_number(field, v, path)
	if type(v) == "string" then
		local n = field.values[v];
		if n == nil then
			fail(format("%s: unknown %s value %q", path, field.ref, v));
		end
		return n;
	elseif math_type(v) == "integer" or math_type(v) == "float" then
		local n = tointeger(v);
		if n == nil or n < -0x80000000 or n > 0x7FFFFFFF then
			fail(format("%s: %s is not a valid %s number", path, tostring(v), field.ref));
		end
		return n;
	end
	fail(format("%s: expected a %s name (string), got %s", path, field.ref, describe(v)));
end

local encode_message;

-- The payload of one value (no tag) and whether it is the proto3 default.
local function encode_value(field, v, path, depth)
	local t = field.type;
	if t == "string" then
		check_string(v, path);
		return encode_varint(#v) .. v, v == "";
	elseif t == "bytes" then
		if type(v) ~= "string" then
			fail(format("%s: expected a string of bytes, got %s", path, describe(v)));
		end
		return encode_varint(#v) .. v, v == "";
	elseif t == "bool" then
		if type(v) ~= "boolean" then
			fail(format("%s: expected a boolean, got %s", path, describe(v)));
		end
		return v and "\1" or "\0", not v;
	elseif t == "enum" then
		local n = enum_number(field, v, path);
		return encode_varint(n), n == 0;
	elseif t == "double" then
		if type(v) ~= "number" then
			fail(format("%s: expected a number, got %s", path, describe(v)));
		end
		-- proto3 leaves out +0.0 only; -0.0 has a bit set and is sent
		local bits = string_pack("<d", v);
		return bits, bits == "\0\0\0\0\0\0\0\0";
	elseif t == "message" then
		if type(v) ~= "table" then
			fail(format("%s: expected a table (%s), got %s", path, field.ref, describe(v)));
		end
		local payload = encode_message(field.schema, v, path, depth + 1);
		return encode_varint(#payload) .. payload, false;
	end
	local n = check_integer(v, t, path);
	return encode_varint(n), n == 0;
end

local function check_sequence(v, path)
	if type(v) ~= "table" then
		fail(format("%s: expected a list (table), got %s", path, describe(v)));
	end
	local n, count = #v, 0;
	for k in pairs(v) do
		if math_type(k) ~= "integer" or k < 1 then
			fail(format("%s: expected a list, found key %s", path, describe(k)));
		elseif k > n then
			fail(format("%s: list has holes (index %d)", path, k));
		end
		count = count + 1;
	end
	if count ~= n then
		fail(format("%s: list has holes", path));
	end
	return n;
end

function encode_message(schema, tbl, path, depth)
	if depth > MAX_DEPTH then
		fail(format("%s: nested too deeply", path));
	end
	for k in pairs(tbl) do
		if type(k) ~= "string" or not schema.by_name[k] then
			fail(format("%s: unknown field %s", path, type(k) == "string" and format("%q", k) or describe(k)));
		end
	end
	local out, i = {}, 0;
	for _, field in ipairs(schema.fields) do
		local v = tbl[field.name];
		local fpath = path .. "." .. field.name;
		if v == nil then -- luacheck: ignore 542
			-- unset: nothing on the wire
		elseif field.repeated then
			local n = check_sequence(v, fpath);
			if n > 0 and field.packed then
				local parts = {};
				for j = 1, n do
					parts[j] = encode_value(field, v[j], format("%s[%d]", fpath, j), depth);
				end
				local payload = concat(parts);
				i = i + 1;
				out[i] = field.tag .. encode_varint(#payload) .. payload;
			else
				for j = 1, n do
					i = i + 1;
					out[i] = field.tag .. encode_value(field, v[j], format("%s[%d]", fpath, j), depth);
				end
			end
		else
			local payload, is_default = encode_value(field, v, fpath, depth);
			if field.optional or field.type == "message" or not is_default then
				i = i + 1;
				out[i] = field.tag .. payload;
			end
		end
	end
	return concat(out, "", 1, i);
end

-- Encode `tbl` as the message `name`; raises an error naming the field on a
-- value of the wrong type or an unknown field.
local function encode(name, tbl)
	local schema = messages[name];
	if not schema then
		fail(format("unknown message type %s", describe(name)));
	end
	if type(tbl) ~= "table" then
		fail(format("%s: expected a table, got %s", name, describe(tbl)));
	end
	return encode_message(schema, tbl, name, 1);
end

function M.encode(name, tbl)
	local ok, res = pcall(encode, name, tbl);
	if not ok then
		local msg, ours = error_text(res);
		error(ours and ("captions_codec.encode: " .. msg) or res, ours and 2 or 0);
	end
	return res;
end

--------------------------------------------------------------------------------
-- Decoding
--------------------------------------------------------------------------------

local function read_length(s, pos, limit, what)
	local len;
	len, pos = read_varint(s, pos, limit);
	if len < 0 or len > limit - pos + 1 then
		fail(format("%s: truncated length-delimited value at byte %d: length %s but %d bytes left", what, pos,
			len < 0 and format("%u", len) or tostring(len), limit - pos + 1));
	end
	return len, pos;
end

local skip_field;

-- Skip the unknown field whose tag has been read; returns the next position.
function skip_field(s, pos, limit, wire, number, depth)
	if wire == WT_VARINT then
		local _;
		_, pos = read_varint(s, pos, limit);
		return pos;
	elseif wire == WT_FIXED64 or wire == WT_FIXED32 then
		local size = wire == WT_FIXED64 and 8 or 4;
		if limit - pos + 1 < size then
			fail(format("truncated fixed%d field %d at byte %d", size * 8, number, pos));
		end
		return pos + size;
	elseif wire == WT_LEN then
		local len;
		len, pos = read_length(s, pos, limit, format("field %d", number));
		return pos + len;
	elseif wire == WT_START_GROUP then
		if depth > MAX_DEPTH then
			fail("groups nested too deeply");
		end
		while true do
			if pos > limit then
				fail(format("unterminated group %d", number));
			end
			local key;
			key, pos = read_varint(s, pos, limit);
			local inner_number, inner_wire = key >> 3, key & 7;
			if inner_wire == WT_END_GROUP then
				if inner_number ~= number then
					fail(format("group %d closed by end-group %d", number, inner_number));
				end
				return pos;
			end
			if inner_number == 0 or inner_number > 0x1FFFFFFF then
				fail(format("invalid field number %s at byte %d", format("%u", inner_number), pos));
			end
			pos = skip_field(s, pos, limit, inner_wire, inner_number, depth + 1);
		end
	elseif wire == WT_END_GROUP then
		fail(format("unexpected end-group for field %d at byte %d", number, pos));
	end
	fail(format("invalid wire type %d for field %d at byte %d", wire, number, pos));
end

local function defaults_for(schema)
	local t = {};
	for _, field in ipairs(schema.fields) do
		if field.repeated then
			t[field.name] = {};
		elseif not field.optional and field.type ~= "message" then
			local ft = field.type;
			if ft == "string" or ft == "bytes" then
				t[field.name] = "";
			elseif ft == "bool" then
				t[field.name] = false;
			elseif ft == "enum" then
				t[field.name] = field.names[0] or 0;
			elseif ft == "double" then
				t[field.name] = 0.0;
			else
				t[field.name] = 0;
			end
		end
	end
	return t;
end

local decode_into;

-- Read one scalar value of a varint or fixed64 type at pos.
local function read_scalar(field, s, pos, limit, path)
	local t = field.type;
	if t == "double" then
		if limit - pos + 1 < 8 then
			fail(format("%s: truncated double at byte %d", path, pos));
		end
		return (string_unpack("<d", s, pos)), pos + 8;
	end
	local v;
	v, pos = read_varint(s, pos, limit);
	if t == "uint32" then
		v = v & 0xFFFFFFFF;
	elseif t == "bool" then
		v = v ~= 0;
	elseif t == "enum" then
		v = v & 0xFFFFFFFF; -- an int32 on the wire
		if v >= 0x80000000 then
			v = v - 0x100000000;
		end
		v = field.names[v] or v;
	end
	return v, pos;
end

local function read_field(field, s, pos, limit, target, path, depth)
	local t = field.type;
	if t == "string" or t == "bytes" then
		local len;
		len, pos = read_length(s, pos, limit, path);
		local v = sub(s, pos, pos + len - 1);
		if t == "string" and not utf8_len(v) then
			fail(format("%s: string is not valid UTF-8", path));
		end
		return v, pos + len;
	elseif t == "message" then
		local len;
		len, pos = read_length(s, pos, limit, path);
		-- a repeated field gets a new element; a singular one seen twice merges
		local into = not field.repeated and target[field.name] or defaults_for(field.schema);
		decode_into(field.schema, s, pos, pos + len - 1, into, path, depth + 1);
		return into, pos + len;
	end
	return read_scalar(field, s, pos, limit, path);
end

function decode_into(schema, s, pos, limit, target, path, depth)
	if depth > MAX_DEPTH then
		fail(format("%s: nested too deeply", path));
	end
	while pos <= limit do
		local key;
		key, pos = read_varint(s, pos, limit);
		local number, wire = key >> 3, key & 7;
		if number == 0 or number > 0x1FFFFFFF then
			fail(format("%s: invalid field number %s at byte %d", path, format("%u", number), pos));
		end
		local field = schema.by_number[number];
		local fpath = field and (path .. "." .. field.name);
		if field and field.repeated and field.packed and wire == WT_LEN then
			local len;
			len, pos = read_length(s, pos, limit, fpath);
			local list, stop = target[field.name], pos + len - 1;
			while pos <= stop do
				local v;
				v, pos = read_scalar(field, s, pos, stop, fpath);
				list[#list + 1] = v;
			end
		elseif field and wire == field.wire then
			local v;
			v, pos = read_field(field, s, pos, limit, target, fpath, depth);
			if field.repeated then
				local list = target[field.name];
				list[#list + 1] = v;
			else
				target[field.name] = v;
			end
		else
			-- unknown field, or a known one with a foreign wire type: skipped
			pos = skip_field(s, pos, limit, wire, number, depth);
		end
	end
	return target;
end

local function decode(name, data)
	local schema = messages[name];
	if not schema then
		fail(format("unknown message type %s", describe(name)));
	end
	if type(data) ~= "string" then
		fail(format("%s: expected a string of bytes, got %s", name, describe(data)));
	end
	return decode_into(schema, data, 1, #data, defaults_for(schema), name, 1);
end

-- Decode the bytes of message `name`: the table, or nil and an error message.
function M.decode(name, data)
	local ok, res = pcall(decode, name, data);
	if not ok then
		local msg = error_text(res);
		if type(name) == "string" and sub(msg, 1, #name) ~= name then
			msg = name .. ": " .. msg;
		end
		return nil, "captions_codec.decode: " .. msg;
	end
	return res;
end

--------------------------------------------------------------------------------
-- gRPC-Web
--------------------------------------------------------------------------------

local status = {
	OK = 0, CANCELLED = 1, UNKNOWN = 2, INVALID_ARGUMENT = 3, DEADLINE_EXCEEDED = 4,
	NOT_FOUND = 5, ALREADY_EXISTS = 6, PERMISSION_DENIED = 7, RESOURCE_EXHAUSTED = 8,
	FAILED_PRECONDITION = 9, ABORTED = 10, OUT_OF_RANGE = 11, UNIMPLEMENTED = 12,
	INTERNAL = 13, UNAVAILABLE = 14, DATA_LOSS = 15, UNAUTHENTICATED = 16,
};
local status_names = {};
for name, code in pairs(status) do
	status_names[code] = name;
end

local FLAG_DATA, FLAG_COMPRESSED, FLAG_TRAILERS = 0x00, 0x01, 0x80;

-- One gRPC-Web frame: flag byte, 4-byte big-endian length, payload. With
-- `trailers` true it is a trailer frame (0x80).
function M.frame(payload, trailers)
	if type(payload) ~= "string" then
		error(format("captions_codec.frame: expected a string, got %s", describe(payload)), 2);
	end
	return string_pack(">Bs4", trailers and FLAG_TRAILERS or FLAG_DATA, payload);
end

-- %XX escapes of a grpc-message back to bytes; a stray % stays as it is.
function M.percent_decode(s)
	return (s:gsub("%%(%x%x)", function (hex) return char(tonumber(hex, 16)); end));
end

local function trim(s)
	return (s:match("^%s*(.-)%s*$"));
end

-- The "key:value\r\n" block of a trailer frame, keys lowercased; repeated keys
-- are joined with "," as HTTP does.
function M.parse_trailers(payload)
	local out = {};
	for line in (payload .. "\n"):gmatch("([^\n]*)\n") do
		local key, value = line:match("^([^:]*):(.*)$");
		if key then
			key, value = trim(key):lower(), trim(value);
			out[key] = out[key] and (out[key] .. "," .. value) or value;
		end
	end
	return out;
end

-- Header lookup that does not care about the case of the names. A value given
-- as a list (several headers of that name) is joined with ",".
local function get_header(headers, name)
	if type(headers) ~= "table" then
		return nil;
	end
	local v = headers[name];
	if v == nil then
		for k, value in pairs(headers) do
			if type(k) == "string" and k:lower() == name then
				v = value;
				break;
			end
		end
	end
	if type(v) == "table" then
		v = concat(v, ",");
	end
	if v ~= nil then
		return tostring(v);
	end
	return nil;
end

-- The gRPC code for an HTTP error status, as gRPC's http-grpc-status-mapping.md.
local http_to_grpc = {
	[400] = status.INTERNAL, [401] = status.UNAUTHENTICATED, [403] = status.PERMISSION_DENIED,
	[404] = status.UNIMPLEMENTED, [429] = status.UNAVAILABLE, [502] = status.UNAVAILABLE,
	[503] = status.UNAVAILABLE, [504] = status.UNAVAILABLE,
};

local function printable_snippet(s, max)
	if type(s) ~= "string" or s == "" then
		return "";
	end
	s = trim(sub(s, 1, max)):gsub("[%c\128-\255]", "?");
	return s;
end

local function result_of(code, message, payload, trailers)
	return {
		ok = code == status.OK,
		status = code,
		status_name = status_names[code] or "UNKNOWN",
		status_message = message,
		message = code == status.OK and payload or nil,
		trailers = trailers or {},
	};
end

local function internal(msg, trailers)
	return result_of(status.INTERNAL, msg, nil, trailers);
end

local function parse_status(code_text, message_text, trailers)
	local digits = code_text:match("^%s*(%d+)%s*$");
	local code = digits and tointeger(tonumber(digits));
	if not code then
		return nil, internal(format("malformed grpc-status %q", code_text), trailers);
	end
	return code, M.percent_decode(message_text or "");
end

-- Read a unary gRPC-Web response. body: the HTTP body (string); headers: the
-- HTTP response headers (any case); http_status: the HTTP status code when
-- known (net.http's `code`, 0 when the request failed before a response).
-- Returns { ok, status, status_name, status_message, message, trailers }:
-- `message` is the payload of the response's data frame when ok; never raises.
function M.parse_response(body, headers, http_status)
	if http_status ~= nil then
		http_status = tointeger(tonumber(http_status)) or 0;
	end
	if http_status ~= nil and http_status ~= 200 then
		if http_status == 0 then
			-- net.http passes the error text as the body with code 0
			return result_of(status.UNAVAILABLE, format("HTTP request failed: %s", tostring(body)));
		end
		local header_status = get_header(headers, "grpc-status");
		if header_status then
			local code, msg = parse_status(header_status, get_header(headers, "grpc-message"));
			if not code then
				return msg;
			end
			return result_of(code == status.OK and status.UNKNOWN or code, msg);
		end
		local snippet = printable_snippet(body, 200);
		return result_of(http_to_grpc[http_status] or status.UNKNOWN,
			format("HTTP status %d%s", http_status, snippet ~= "" and (": " .. snippet) or ""));
	end
	if body == nil then
		body = "";
	elseif type(body) ~= "string" then
		return internal(format("response body is a %s, not a string", type(body)));
	end
	local content_type = get_header(headers, "content-type");
	if content_type then
		local ct = trim(content_type):lower();
		if not (ct == "application/grpc-web" or ct:match("^application/grpc%-web%+proto")
				or ct:match("^application/grpc%-web;")) then
			return internal(format("unexpected content-type %q (expected %s)", content_type, M.CONTENT_TYPE));
		end
	end

	local data, trailer_payload = {}, nil;
	local pos, size = 1, #body;
	while pos <= size do
		if size - pos + 1 < 5 then
			return internal(format("malformed gRPC-Web response: truncated frame header (%d of 5 bytes)",
				size - pos + 1));
		end
		local flag, len = string_unpack(">BI4", body, pos);
		pos = pos + 5;
		if len > size - pos + 1 then
			return internal(format(
				"malformed gRPC-Web response: truncated frame (header says %d bytes, %d follow)",
				len, size - pos + 1));
		end
		local payload = sub(body, pos, pos + len - 1);
		pos = pos + len;
		if flag & FLAG_COMPRESSED ~= 0 then
			return internal(format("malformed gRPC-Web response: compressed frame (flags 0x%02x) not supported",
				flag));
		elseif trailer_payload then
			return internal("malformed gRPC-Web response: frame after the trailer frame");
		elseif flag == FLAG_TRAILERS then
			trailer_payload = payload;
		elseif flag == FLAG_DATA then
			data[#data + 1] = payload;
		else
			return internal(format("malformed gRPC-Web response: unknown frame flags 0x%02x", flag));
		end
	end

	local trailers = trailer_payload and M.parse_trailers(trailer_payload) or {};
	local code_text, message_text = trailers["grpc-status"], trailers["grpc-message"];
	if code_text == nil then
		-- trailers-only: the status is in the HTTP headers
		code_text, message_text = get_header(headers, "grpc-status"), get_header(headers, "grpc-message");
		if code_text == nil then
			if trailer_payload then
				return internal("malformed gRPC-Web response: trailer frame without grpc-status", trailers);
			elseif #data > 0 then
				return internal("malformed gRPC-Web response: no trailer frame after the message (truncated?)");
			end
			return internal("malformed gRPC-Web response: empty body and no grpc-status header");
		end
		trailers["grpc-status"], trailers["grpc-message"] = code_text, message_text;
	end
	local code, msg = parse_status(code_text, message_text, trailers);
	if not code then
		return msg;
	end
	if code == status.OK then
		if #data == 0 then
			return internal("malformed gRPC-Web response: status OK without a response message", trailers);
		elseif #data > 1 then
			return internal(format("malformed gRPC-Web response: %d messages for a unary call", #data), trailers);
		end
	end
	return result_of(code, msg, data[1], trailers);
end

-- A grpc-timeout header value for `seconds`: at least 1 ms, rounded up, in the
-- smallest unit that fits 8 digits.
function M.format_timeout(seconds)
	if type(seconds) ~= "number" or seconds ~= seconds then
		error(format("captions_codec.format_timeout: expected a number of seconds, got %s", describe(seconds)), 2);
	end
	local millis = seconds <= 0 and 1 or math_ceil(seconds * 1000);
	if seconds == huge or math_type(millis) ~= "integer" or millis > 1e17 then
		return "99999999H";
	end
	for _, unit in ipairs({ { "m", 1 }, { "S", 1000 }, { "M", 60000 }, { "H", 3600000 } }) do
		local count = (millis + unit[2] - 1) // unit[2];
		if count <= 99999999 then
			return format("%d%s", count, unit[1]);
		end
	end
	return "99999999H";
end

local function check_header_value(name, v)
	if type(v) ~= "string" or v:find("[\r\n%z]") then
		error(format("captions_codec.request: %s must be a string without CR, LF or NUL, got %s",
			name, describe(v)), 3);
	end
	return v;
end

-- The HTTP POST for a unary call: path (append it to the sidecar's base URL),
-- body and headers. message_name may be nil (the method's request type); when
-- given it must be that type. opts: { token = "<bearer token>",
-- timeout = <seconds> }. Header names are spelled as net.http spells its
-- own, so that "Content-Type" replaces its form-urlencoded default.
function M.request(method_name, message_name, tbl, opts)
	local method = methods[method_name];
	if not method then
		error(format("captions_codec.request: unknown method %s", describe(method_name)), 2);
	end
	if message_name ~= nil and message_name ~= method.request then
		error(format("captions_codec.request: %s takes a %s, not %s", method_name, method.request,
			describe(message_name)), 2);
	end
	if opts ~= nil and type(opts) ~= "table" then
		error(format("captions_codec.request: opts must be a table, got %s", describe(opts)), 2);
	end
	local ok, payload = pcall(encode, method.request, tbl == nil and {} or tbl);
	if not ok then
		local msg, ours = error_text(payload);
		error(ours and ("captions_codec.request: " .. msg) or payload, ours and 2 or 0);
	end
	local headers = {
		["Content-Type"] = M.CONTENT_TYPE,
		["Accept"] = M.CONTENT_TYPE,
		["X-Grpc-Web"] = "1",
	};
	opts = opts or {};
	if opts.token ~= nil then
		headers["Authorization"] = "Bearer " .. check_header_value("opts.token", opts.token);
	end
	if opts.timeout ~= nil then
		if type(opts.timeout) ~= "number" or opts.timeout ~= opts.timeout or opts.timeout < 0 then
			error(format("captions_codec.request: opts.timeout must be a number of seconds >= 0, got %s",
				describe(opts.timeout)), 2);
		end
		headers["Grpc-Timeout"] = M.format_timeout(opts.timeout);
	end
	return "/" .. M.SERVICE .. "/" .. method_name, M.frame(payload), headers;
end

-- parse_response, then the response message decoded as `response` (a table)
-- when ok; a response that does not decode is INTERNAL. Never raises.
function M.decode_response(method_name, body, headers, http_status)
	local method = methods[method_name];
	if not method then
		return internal(format("unknown method %s", describe(method_name)));
	end
	local result = M.parse_response(body, headers, http_status);
	if result.ok then
		local response, err = M.decode(method.response, result.message);
		if not response then
			return internal(format("malformed %s: %s", method.response, err), result.trailers);
		end
		result.response = response;
	end
	return result;
end

--------------------------------------------------------------------------------
-- Public tables
--------------------------------------------------------------------------------

M.status = status;             -- "NOT_FOUND" -> 5
M.status_names = status_names; -- 5 -> "NOT_FOUND"
M.enums = enums;               -- enums.Mode.MODE_AUTO_ON == 3
M.methods = methods;           -- methods.StartCaptions.request == "StartRequest"

-- The message names known to encode and decode, sorted.
M.message_names = {};
for name in pairs(messages) do
	M.message_names[#M.message_names + 1] = name;
end
sort(M.message_names);

-- Low-level helpers, for the specs and for debugging.
M.wire = {
	encode_varint = encode_varint,
	-- value, next position; or nil, error
	decode_varint = function (s, pos)
		if type(s) ~= "string" then
			return nil, "expected a string";
		end
		local ok, v, nextpos = pcall(read_varint, s, pos or 1, #s);
		if not ok then
			return nil, (error_text(v));
		end
		return v, nextpos;
	end,
};

return M;
