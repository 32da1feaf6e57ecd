-- mod_test_token_features: what jitsi-meet's token authentication leaves on
-- a session, for users named in the config, on a VirtualHost:
--
--   test_token_features = { alice = { transcription = "true" }, bob = { recording = true } }
--
-- A listed user's session gets session.auth_token (a placeholder) and
-- session.jitsi_meet_context_features = that table (what mod_auth_token sets
-- from the JWT's context.features; jitsi-meet
-- resources/prosody-plugins/token/util.lib.lua, read 2026). A user not listed
-- has no token and no features table, as an anonymous or password login.
-- Jitsi's is_feature_allowed (util.lib.lua) then allows a feature only when
-- features[ft] is true or "true"; with no table it falls back to the role.
local features_by_user = module:get_option("test_token_features", {});

local function copy(t)
	local out = {};
	for k, v in pairs(t) do out[k] = v; end
	return out;
end

module:hook("resource-bind", function (event)
	local session = event.session;
	local features = features_by_user[session.username];
	if type(features) == "table" then
		session.auth_token = "test-token-" .. session.username;
		session.jitsi_meet_context_features = copy(features);
		session.jitsi_meet_context_user = { id = session.username, name = session.username };
		module:log("info", "token features for %s", session.full_jid);
	end
end, 100);
