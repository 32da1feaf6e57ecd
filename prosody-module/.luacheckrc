-- luacheck configuration for the Prosody module and its specs.
-- Run from this directory: luacheck .
-- (luacheck itself runs on Lua 5.1 in Debian; std says what the code targets.)

-- Prosody 0.12 from Debian runs on Lua 5.4.
std = "lua54"
max_line_length = 150
exclude_files = { ".luarocks/", "lua_modules/" }

-- Prosody loads a module (and each module:require'd library) in an
-- environment of its own whose fallback is Prosody's _G: `module` is the
-- module's API object; prosody, hosts, bare_sessions, full_sessions and log
-- are globals that Prosody's startup defines.
local prosody_globals = {
	module = {
		-- a module sets its callbacks on it (function module.load() ... end)
		fields = {
			load = { read_only = false },
			unload = { read_only = false },
			add_host = { read_only = false },
			save = { read_only = false },
			restore = { read_only = false },
			command = { read_only = false },
			ready = { read_only = false },
		},
		-- name, host, path, environment, the API methods (module:hook(), ...)
		other_fields = true,
	},
}

files["**/mod_*.lua"] = {
	globals = prosody_globals,
	read_globals = {
		prosody = { other_fields = true },
		hosts = { other_fields = true },
		bare_sessions = { other_fields = true },
		full_sessions = { other_fields = true },
		"log",
	},
	-- Top-level functions of a module live in its own environment, not in
	-- Prosody's _G, so Prosody's style allows them (function handle_x() end).
	allow_defined_top = true,
}

-- Libraries (module:require) share the module's environment, but ours is
-- pure Lua: no Prosody globals, so that it also runs under busted.
files["**/*.lib.lua"] = {
	std = "lua54",
}

files["spec/"] = {
	std = "+busted",
}
