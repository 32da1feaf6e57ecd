-- Paste into /etc/prosody/conf.d/<domain>.cfg.lua (Jitsi's own Prosody config),
-- replacing <domain>. Validate with: luac -p /etc/prosody/conf.d/<domain>.cfg.lua

-- Where mod_captions is installed (the Ansible role copies prosody-module/ here).
plugin_paths = { "/usr/share/jitsi-meet/prosody-plugins/", "/usr/local/lib/jitsi-captions/prosody-module/" }

-- The hidden domain: the transcriber account lives here. Jitsi Meet's
-- config.js names it as hiddenDomain, so its occupant is not shown as a
-- participant and its json-messages are accepted as captions.
VirtualHost "recorder.<domain>"
    modules_enabled = { "smacks"; "ping"; }
    authentication = "internal_hashed"

-- On the existing MUC component of Jitsi (keep its other modules and options).
Component "conference.<domain>" "muc"
    modules_enabled = {
        -- (Jitsi's existing modules stay here)
        "captions";
    }
    -- Clients see real JIDs, so they can tell the transcriber by its domain.
    muc_room_default_public_jids = true

    -- The sidecar's gRPC-Web listener (its [server] http_listen) and token.
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
    -- Videobridge export path: mark rooms for audio-only transcription so
    -- the CC button uses Jicofo's transcription WebSocket (needs jicofo.conf).
    captions_async_transcription = false
    -- How often the module checks that the sidecar still serves its rooms
    -- (and re-applies them after a sidecar restart).
    captions_health_check_interval = 15
