-- mod_test_features_identity: on the main VirtualHost, turns each
-- "jitsi-add-identity" {name, host} into a disco#info identity
-- category="component" type=name name=host, as jitsi-meet's
-- resources/prosody-plugins/mod_features_identity.lua does (read 2026, no code
-- taken). Jicofo (XmppProvider.discoverComponents) reads these identities.
local added = {};
module:hook("jitsi-add-identity", function (event)
	local key = event.name .. "\0" .. event.host;
	if added[key] then return; end
	added[key] = true;
	module:log("info", "identity component/%s at %s", event.name, event.host);
	module:add_identity("component", event.name, event.host);
end);
