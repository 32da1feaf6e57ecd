// Paste into /etc/jitsi/meet/<domain>-config.js, inside `var config = { ... }`.
// What the stock Jitsi Meet UI needs to show the CC button and the subtitles
// that the captions sidecar produces.

    // The transcriber logs in on this domain; clients hide its occupant and
    // accept captions (json-message) only from a hidden participant.
    hiddenDomain: 'recorder.<domain>',

    transcription: {
        // Shows the CC button and lets the UI request transcription.
        enabled: true,
        // Languages offered in the subtitles menu (BCP-47; the sidecar knows
        // about 50, see its `[defaults] language`).
        translationLanguages: ['en', 'de', 'fr', 'es', 'it', 'pt', 'nl', 'pl', 'ja', 'zh'],
        translationLanguagesHead: ['en'],
        // Follow the UI language for the spoken language of the viewer.
        useAppLanguage: true,
        // The spoken language when not following the UI (a code from the
        // sidecar's list, e.g. 'en-US', 'pt-BR', 'nl-BE').
        preferredLanguage: 'en-US',
        // Recording with transcription also shows captions.
        autoCaptionOnTranscribe: true,
        // Admin toggle: set true to hide the CC button for everybody while
        // keeping transcripts (the sidecar's captions mode 'disabled' also
        // refuses captions server-side).
        disableClosedCaptions: false,
    },

    // Admin toggle: leave interims on; with true the UI shows finals only.
    testing: {
        skipInterimTranscriptions: false,
    },

    // The toolbar button for subtitles; keep your other buttons in the list.
    toolbarButtons: [
        'camera', 'chat', 'closedcaptions', 'desktop', 'hangup', 'microphone',
        'participants-pane', 'raisehand', 'settings', 'tileview', 'toggle-camera',
    ],
