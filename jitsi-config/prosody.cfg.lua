-- mod_captions on a stock Jitsi Meet Prosody: EDITS to make IN PLACE in
-- /etc/prosody/conf.avail/<domain>.cfg.lua (the file the jitsi-meet-prosody
-- package wrote; /etc/prosody/conf.d/<domain>.cfg.lua links to it).
--
-- Do NOT paste a second `Component "conference.<domain>" "muc"` block: Prosody
-- takes the last `modules_enabled` of a host, so a second block with its own
-- list replaces the stock one and drops muc_meeting_id (the videobridge
-- export's {{MEETING_ID}} needs it), muc_domain_mapper, polls and the rate
-- limits. Likewise add the hidden-domain VirtualHost only if the file has none
-- (newer jitsi-meet-prosody templates declare `VirtualHost "recorder.<domain>"`).
--
-- The Ansible role in ansible/ makes exactly these edits, validates them with
-- `luac -p` and `prosodyctl check config` before they replace the file, and
-- finds them again on a second run. By hand, check before restarting Prosody:
--     luac -p /etc/prosody/conf.avail/<domain>.cfg.lua && prosodyctl check config
--
-- Everything below is valid Lua on its own (luac -p passes), but it is not a
-- file to include: each numbered part says where its lines go.

-- 1. Global section, the EXISTING plugin_paths line: add the module's folder.
--    The stock line reads  plugin_paths = { "/usr/share/jitsi-meet/prosody-plugins/" }
plugin_paths = { "/usr/share/jitsi-meet/prosody-plugins/", "/usr/local/lib/jitsi-captions/prosody-module/" }

-- 2. The hidden domain, ONLY where the file has no `VirtualHost "recorder.<domain>"`
--    yet. The transcriber account lives here; config.js names it as hiddenDomain,
--    so its occupant is not shown as a participant and its json-messages are
--    accepted as captions. Then create the account once:
--        prosodyctl register transcriber recorder.<domain> '<password>'
--
--    VirtualHost "recorder.<domain>"
--        modules_enabled = { "ping"; }
--        authentication = "internal_hashed"

-- 3. Inside the EXISTING `VirtualHost "<domain>"` block (the main host): let the
--    transcriber past the lobby and keep it out of the visitors logic. The stock
--    file has `-- muc_lobby_whitelist = { "recorder.<domain>" }` commented out:
--    uncomment it (or add the hidden domain to a list that is already there).
--
--        muc_lobby_whitelist = { "recorder.<domain>" }
--        visitors_ignore_list = { "recorder.<domain>" }

-- 4. The EXISTING `Component "conference.<domain>" "muc"` block: add one entry to
--    its modules_enabled list, keeping every stock entry. As the stock list
--    reads after the edit (the two marked lines are the additions; add
--    "muc_password_whitelist" only if the list lacks it):
--
--        modules_enabled = {
--            "muc_meeting_id";
--            "muc_domain_mapper";
--            "polls";
--            --"token_verification";
--            "muc_rate_limit";
--            "captions";                  -- added: mod_captions
--            "muc_password_whitelist";    -- added: password-protected rooms
--        }
--
--    Then, in the same block after the list, the password whitelist (full JIDs;
--    keep focus in it) and the module's options:
--
--        muc_password_whitelist = { "focus@auth.<domain>"; "transcriber@recorder.<domain>" }
--
--    The lines below go there as they are (they are options of that component).

-- The sidecar's gRPC-Web listener (its [server] http_listen) and token file.
captions_sidecar_url = "http://127.0.0.1:8088"
captions_token_file = "/etc/jitsi-captions/token"
captions_request_timeout = 5          -- seconds per call (a timeout is not retried)
captions_retries = 2                  -- extra attempts when the sidecar is unavailable
-- The transcriber account (for the <ref uri> of the dial answer) and the
-- domains whose occupants are not counted as participants.
captions_transcriber_jid = "transcriber@recorder.<domain>"
captions_hidden_domain = "recorder.<domain>"
captions_exclude_domains = { "auth.<domain>" }
-- Deployment defaults; rooms may override them in their metadata
-- (room.jitsiMetadata.captions = { language = "de", ... }).
captions_language = "en-US"
captions_transcription_mode = "available"   -- disabled | available | auto-on
captions_captions_mode = "available"
captions_trigger = "manual"                 -- manual | automatic | automatic-2nd-participant
-- Videobridge export path: mark rooms for audio-only transcription so the CC
-- button uses Jicofo's transcription WebSocket (needs the jicofo.conf part).
captions_async_transcription = false
-- How often the module checks that the sidecar still serves its rooms (and
-- re-applies them after a sidecar restart).
captions_health_check_interval = 15

-- The stock component already has muc_room_default_public_jids = true, which
-- the module needs (clients tell the transcriber by its real JID's domain).

-- 5. Optional, for the Grafana overview's dial outcomes: in the global section,
--        statistics = "internal"
--    and "http_openmetrics" in the global modules_enabled; Prometheus scrapes
--    http://127.0.0.1:5280/metrics (openmetrics_allow_ips: loopback by default).
