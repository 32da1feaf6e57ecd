-- Test driver for tests/test_lua_codec.py: runs captions_codec calls and
-- prints one JSON line per call.
--
--   lua5.4 spec/codec_driver.lua < calls.lua
--
-- stdin is a Lua chunk (written by the Python test) that returns a list of
-- calls, each { op, ... }:
--   { "encode", message_name, table }            -> hex of the bytes
--   { "decode", message_name, hex }              -> the decoded table
--   { "request", method, message_name, table, opts }
--                                                -> { path, body = hex, headers }
--   { "decode_response", method, body_hex, headers, http_status }
--                                                -> the result, message as hex
-- Each output line is {"ok":true,"value":...} or {"ok":false,"error":"..."}
-- (encode and request raise errors, decode returns nil, err: both are ok=false).
-- The chunk runs in an empty environment: it can only build tables.

local spec_dir = (debug.getinfo(1, "S").source:match("^@(.*)[/\\]")) or ".";
package.path = spec_dir .. "/../mod_captions/?.lib.lua;" .. package.path;
local codec = require("captions_codec");

local function hex(s)
	return (s:gsub(".", function (c) return string.format("%02x", c:byte()); end));
end

local function unhex(h)
	return (h:gsub("%x%x", function (x) return string.char(tonumber(x, 16)); end));
end

-- A small JSON writer: strings are written as they are (the test reads the
-- output as UTF-8), control characters escaped; an empty table is {}.
local function json(v, out)
	local t = type(v);
	if t == "nil" then
		out[#out + 1] = "null";
	elseif t == "boolean" then
		out[#out + 1] = tostring(v);
	elseif t == "number" then
		if math.type(v) == "integer" then
			out[#out + 1] = string.format("%d", v);
		elseif v ~= v then
			out[#out + 1] = "NaN";
		elseif v == math.huge then
			out[#out + 1] = "Infinity";
		elseif v == -math.huge then
			out[#out + 1] = "-Infinity";
		else
			-- keep it a float for the reader (-0.0 included)
			local text = string.format("%.17g", v);
			out[#out + 1] = text:find("[.eEn]") and text or (text .. ".0");
		end
	elseif t == "string" then
		out[#out + 1] = '"' .. v:gsub('[%c"\\]', function (c)
			return string.format("\\u%04x", c:byte());
		end) .. '"';
	elseif t == "table" then
		local n, count = #v, 0;
		for _ in pairs(v) do
			count = count + 1;
		end
		if n > 0 and n == count then
			out[#out + 1] = "[";
			for i = 1, n do
				if i > 1 then
					out[#out + 1] = ",";
				end
				json(v[i], out);
			end
			out[#out + 1] = "]";
		else
			local keys = {};
			for k in pairs(v) do
				keys[#keys + 1] = tostring(k);
			end
			table.sort(keys);
			out[#out + 1] = "{";
			for i, k in ipairs(keys) do
				if i > 1 then
					out[#out + 1] = ",";
				end
				json(k, out);
				out[#out + 1] = ":";
				json(v[k] == nil and v[tonumber(k)] or v[k], out);
			end
			out[#out + 1] = "}";
		end
	else
		error("cannot write a " .. t .. " as JSON");
	end
	return out;
end

local ops = {};

function ops.encode(name, tbl)
	return hex(codec.encode(name, tbl));
end

function ops.decode(name, h)
	local t, err = codec.decode(name, unhex(h));
	if t == nil then
		error(err, 0);
	end
	return t;
end

function ops.request(method, message_name, tbl, opts)
	local path, body, headers = codec.request(method, message_name, tbl, opts);
	return { path = path, body = hex(body), headers = headers };
end

function ops.decode_response(method, body_hex, headers, http_status)
	local result = codec.decode_response(method, body_hex and unhex(body_hex), headers, http_status);
	if result.message then
		result.message = hex(result.message);
	end
	return result;
end

local chunk = assert(load(io.read("a"), "=calls", "t", {}));
for _, call in ipairs(chunk()) do
	local op = assert(ops[call[1]], call[1]);
	local ok, value = pcall(op, table.unpack(call, 2, call.n or #call));
	local line;
	if ok then
		line = { ok = true, value = value };
	else
		line = { ok = false, error = tostring(value) };
	end
	io.write(table.concat(json(line, {})), "\n");
end
