-- mod_test_meeting_id: the meeting id of every room, on the MUC component.
--
-- From jitsi-meet's resources/prosody-plugins/mod_muc_meeting_id.lua (read
-- 2026, no code taken):
--  1. muc-room-created: room._data.meetingId = a new UUID (not for
--     __jicofo-health-check rooms).
--  2. The room's disco#info form and its owner configuration form (the form
--     Jicofo reads, ChatRoomImpl.joinAs: muc#roominfo_meetingId) carry a
--     text-single field "muc#roominfo_meetingId" with that id.
--  3. Only an admin (Jicofo) may overwrite it by submitting the form.
-- Not done: the jicofo_lock queue that holds joins until the focus is in.
local uuid = require "util.uuid";
local usermanager = require "core.usermanager";

local FIELD = "muc#roominfo_meetingId";

local function field(room)
	return { name = FIELD, type = "text-single", label = "The meeting unique id.",
		value = room._data.meetingId or "" };
end

module:hook("muc-room-created", function (event)
	local room = event.room;
	if room.jid:sub(1, #"__jicofo-health-check") == "__jicofo-health-check" then return; end
	room._data.meetingId = uuid.generate();
	module:log("debug", "meetingId %s for %s", room._data.meetingId, room.jid);
end);

module:hook("muc-disco#info", function (event)
	table.insert(event.form, field(event.room));
end);

module:hook("muc-config-form", function (event)
	table.insert(event.form, field(event.room));
end, 90 - 3);

module:hook("muc-config-submitted/" .. FIELD, function (event)
	if usermanager.is_admin(event.actor, module.host) then
		event.room._data.meetingId = event.value;
		return;
	end
	return true;
end, 99);
