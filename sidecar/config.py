"""Settings of rooms and of the deployment.

Two kinds of settings live here:

* Per-room settings (:class:`RoomSettings`, :class:`EffectiveSettings`), which
  the control API carries as ``captions.v1.Settings``. They resolve as
  deployment defaults < room settings < start-call parameters, see
  :func:`resolve`. Bad values raise :class:`SettingError`, which the API
  answers with INVALID_ARGUMENT.
* The deployment configuration (:class:`SidecarConfig`), read once at start
  by :func:`load_config` from a TOML file and ``CAPTIONS_*`` environment
  variables. Bad values raise :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from sidecar.errors import shown
from sidecar.proto.captions.v1 import captions_pb2

__all__ = [
    "BUNDLED_WHISPER_MODELS",
    "COMPUTE_TYPES",
    "DEVICES",
    "LANGUAGES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_SPEECH_CAPTION_MS_RANGE",
    "PROVIDERS",
    "PROVIDER_SECTIONS",
    "SILENCE_DURATION_MS_RANGE",
    "STORAGE_BACKENDS",
    "ConfigError",
    "EffectiveSettings",
    "LimitsConfig",
    "LinksConfig",
    "LoggingConfig",
    "Mode",
    "RoomSettings",
    "RetentionConfig",
    "S3Config",
    "ServerConfig",
    "SettingError",
    "SidecarConfig",
    "StoreConfig",
    "Trigger",
    "WebhookEndpoint",
    "WhisperConfig",
    "canonical_language",
    "is_english",
    "load_config",
    "mode_from_proto",
    "mode_to_proto",
    "resolve",
    "settings_from_proto",
    "settings_to_proto",
    "trigger_from_proto",
    "trigger_to_proto",
    "whisper_language",
]

# ---------------------------------------------------------------------------
# Errors


class SettingError(ValueError):
    """A room setting is invalid.

    ``str()`` reads ``"<field>: <message>"`` and the message always says what
    is allowed, because it goes back verbatim to the API caller.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickling passes the formatted string as the only
        # argument, which does not fit __init__; errors cross process pools.
        return (type(self), (self.field, self.message))


class ConfigError(ValueError):
    """The deployment configuration is invalid.

    ``source`` names where the value came from (the file or the environment
    variable), ``key`` is ``section.key``; ``str()`` combines all three.
    """

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source = source
        self.key = key
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.key, self.message))


# ---------------------------------------------------------------------------
# Languages

# The languages that Jitsi Meet's transcription/translation UI, Azure Speech
# and Google Speech-to-Text all offer, restricted to those Whisper knows.
# Regional codes are listed only where the region changes what users expect
# (spelling, vocabulary, script); the bare tag covers the rest.
_BARE_LANGUAGES = (
    "ar", "bg", "ca", "cs", "da", "de", "el", "en", "es", "et", "fa", "fi",
    "fr", "he", "hi", "hr", "hu", "id", "it", "ja", "ko", "lt", "lv", "nb",
    "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sv", "th", "tr", "uk", "vi",
)  # fmt: skip
_REGIONAL_LANGUAGES = (
    "de-DE", "en-AU", "en-GB", "en-US", "es-ES", "es-MX", "es-US", "fr-CA",
    "fr-FR", "nl-BE", "nl-NL", "pt-BR", "pt-PT", "zh-CN", "zh-TW",
)  # fmt: skip

LANGUAGES: tuple[str, ...] = ("auto", *sorted(_BARE_LANGUAGES + _REGIONAL_LANGUAGES))
"""Every language a room may use: BCP-47 codes plus ``"auto"`` (detection)."""

# Spellings other systems send for a listed language: Google and Jitsi still
# use the withdrawn "iw" for Hebrew, Jitsi says "no-NO" for Bokmål and a bare
# "zh" for simplified Chinese.
_LANGUAGE_ALIASES = {
    "iw": "he",
    "iw-il": "he",
    "he-il": "he",
    "no": "nb",
    "no-no": "nb",
    "nb-no": "nb",
    "zh": "zh-CN",
    "zh-hans": "zh-CN",
    "zh-hant": "zh-TW",
}

_LANGUAGE_LOOKUP = {code.lower(): code for code in LANGUAGES} | _LANGUAGE_ALIASES

# Whisper calls Bokmål "no"; the aliases above already turned "iw" into "he".
_WHISPER_PRIMARY = {"nb": "no"}


def canonical_language(code: str, field: str = "language") -> str:
    """Return the spelling of ``code`` used in :data:`LANGUAGES`.

    Matching ignores case and accepts ``_`` for ``-`` ("PT_br" -> "pt-BR");
    a few legacy spellings ("iw", "no", "zh") map to their listed code.
    Raises :class:`SettingError` for ``field`` when the code is not listed.
    """
    key = code.strip().replace("_", "-").lower() if isinstance(code, str) else None
    canonical = _LANGUAGE_LOOKUP.get(key) if key is not None else None
    if canonical is None:
        raise SettingError(
            field, f"{shown(code)} is not a supported language (one of: {', '.join(LANGUAGES)})"
        )
    return canonical


def whisper_language(code: str) -> str | None:
    """Return the language code Whisper understands for ``code``.

    That is the primary tag, renamed where Whisper differs ("nb" -> "no",
    "iw" -> "he"); every Chinese variant is "zh". ``"auto"`` gives None,
    meaning Whisper should detect the language. Unknown codes raise
    :class:`SettingError`.
    """
    canonical = canonical_language(code)
    if canonical == "auto":
        return None
    primary = canonical.split("-", 1)[0].lower()
    return _WHISPER_PRIMARY.get(primary, primary)


def is_english(code: str) -> bool:
    """Whether ``code`` is English (any region); ``"auto"`` is not.

    Deliberately lenient: it only looks at the primary tag and never raises,
    so callers can use it on codes that have not been validated.
    """
    return code.strip().replace("_", "-").split("-", 1)[0].lower() == "en"


# ---------------------------------------------------------------------------
# Enums


def _enum_key(value: str) -> str:
    return value.strip().lower().replace("_", "-")


class Mode(StrEnum):
    """Whether transcription or captions can run in a room."""

    DISABLED = "disabled"  # nobody can start it
    AVAILABLE = "available"  # started on request
    AUTO_ON = "auto-on"  # started by the trigger

    @classmethod
    def _missing_(cls, value: object) -> Mode | None:
        # Accept "AUTO_ON", "Auto-On" and the like from TOML, env and APIs.
        if isinstance(value, str):
            key = _enum_key(value)
            for member in cls:
                if member.value == key:
                    return member
        return None

    @classmethod
    def parse(cls, value: str, field: str = "mode") -> Self:
        """Parse ``value`` (case-insensitive, ``_`` or ``-``) or raise SettingError."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise SettingError(field, f"{shown(value)} is not one of {allowed}") from None


class Trigger(StrEnum):
    """What starts transcription or captions in a room set to ``auto-on``."""

    MANUAL = "manual"
    AUTOMATIC = "automatic"  # the first participant
    AUTOMATIC_2ND_PARTICIPANT = "automatic-2nd-participant"

    @classmethod
    def _missing_(cls, value: object) -> Trigger | None:
        if isinstance(value, str):
            key = _enum_key(value)
            for member in cls:
                if member.value == key:
                    return member
        return None

    @classmethod
    def parse(cls, value: str, field: str = "trigger") -> Self:
        """Parse ``value`` (case-insensitive, ``_`` or ``-``) or raise SettingError."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(t.value for t in cls)
            raise SettingError(field, f"{shown(value)} is not one of {allowed}") from None


# ---------------------------------------------------------------------------
# Room settings

PROVIDERS: tuple[str, ...] = ("whisper", "azure", "google")
MAX_SPEECH_CAPTION_MS_RANGE: tuple[int, int] = (5000, 10000)
SILENCE_DURATION_MS_RANGE: tuple[int, int] = (300, 2000)
MAX_TRANSLATION_LANGUAGES = 10


def _check_int(field: str, value: object, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    # bool is an int subclass; True would silently become 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingError(field, f"{shown(value)} is not an integer ({lo}..{hi})")
    if not lo <= value <= hi:
        raise SettingError(field, f"{value} is out of range ({lo}..{hi})")
    return value


def _check_mode(field: str, value: object) -> Mode:
    if isinstance(value, Mode):
        return value
    if isinstance(value, str):
        return Mode.parse(value, field)
    raise SettingError(field, f"{shown(value)} is not one of {', '.join(Mode)}")


def _check_trigger(field: str, value: object) -> Trigger:
    if isinstance(value, Trigger):
        return value
    if isinstance(value, str):
        return Trigger.parse(value, field)
    raise SettingError(field, f"{shown(value)} is not one of {', '.join(Trigger)}")


def _check_translation_languages(value: object) -> tuple[str, ...]:
    name = "translation_languages"
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise SettingError(name, f"{shown(value)} is not a list of language codes")
    codes = list(itertools.islice(value, 4 * MAX_TRANSLATION_LANGUAGES + 1))
    if len(codes) > 4 * MAX_TRANSLATION_LANGUAGES:
        raise SettingError(name, f"at most {MAX_TRANSLATION_LANGUAGES} distinct languages")
    result: list[str] = []
    for code in codes:
        canonical = canonical_language(code, name)
        if canonical == "auto":
            raise SettingError(name, "'auto' is not a translation target (name a language)")
        # Duplicates would translate and send the same caption twice.
        if canonical not in result:
            result.append(canonical)
            if len(result) > MAX_TRANSLATION_LANGUAGES:
                # each one is a translation of every caption
                raise SettingError(name, f"at most {MAX_TRANSLATION_LANGUAGES} distinct languages")
    return tuple(result)


@dataclass(frozen=True)
class RoomSettings:
    """One layer of room settings; None means "not set at this layer".

    Used for the room's own settings and for start-call parameters. Values
    are checked by :meth:`validate`, not at construction, so a layer can be
    built from raw input and validated where the error can be reported.
    """

    language: str | None = None
    transcription_mode: Mode | None = None
    captions_mode: Mode | None = None
    trigger: Trigger | None = None
    max_speech_caption_ms: int | None = None
    silence_duration_ms: int | None = None
    interim_results: bool | None = None
    provider: str | None = None
    translation_languages: tuple[str, ...] | None = None

    def validate(self) -> RoomSettings:
        """Return a copy with every set value checked and canonicalised.

        Languages get their canonical spelling, modes and triggers given as
        strings become enum members, the provider is lower-cased and
        translation languages lose duplicates. Raises :class:`SettingError`
        naming the first bad field and what it allows.
        """
        language = self.language
        if language is not None:
            language = canonical_language(language, "language")
        transcription_mode = self.transcription_mode
        if transcription_mode is not None:
            transcription_mode = _check_mode("transcription_mode", transcription_mode)
        captions_mode = self.captions_mode
        if captions_mode is not None:
            captions_mode = _check_mode("captions_mode", captions_mode)
        trigger = self.trigger
        if trigger is not None:
            trigger = _check_trigger("trigger", trigger)
        max_speech = self.max_speech_caption_ms
        if max_speech is not None:
            max_speech = _check_int(
                "max_speech_caption_ms", max_speech, MAX_SPEECH_CAPTION_MS_RANGE
            )
        silence = self.silence_duration_ms
        if silence is not None:
            silence = _check_int("silence_duration_ms", silence, SILENCE_DURATION_MS_RANGE)
        interim = self.interim_results
        if interim is not None and not isinstance(interim, bool):
            raise SettingError(
                "interim_results", f"{shown(interim)} is not a boolean (true or false)"
            )
        provider = self.provider
        if provider is not None:
            key = provider.strip().lower() if isinstance(provider, str) else None
            if key not in PROVIDERS:
                raise SettingError(
                    "provider", f"{shown(provider)} is not one of {', '.join(PROVIDERS)}"
                )
            provider = key
        translations = self.translation_languages
        if translations is not None:
            translations = _check_translation_languages(translations)
        return RoomSettings(
            language=language,
            transcription_mode=transcription_mode,
            captions_mode=captions_mode,
            trigger=trigger,
            max_speech_caption_ms=max_speech,
            silence_duration_ms=silence,
            interim_results=interim,
            provider=provider,
            translation_languages=translations,
        )

    def merged(self, over: RoomSettings) -> RoomSettings:
        """Return these settings with every field that is set in ``over`` replacing ours."""
        return dataclasses.replace(self, **over.set_fields())

    def set_fields(self) -> dict[str, Any]:
        """The fields that are set (not None), by name."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) is not None
        }


@dataclass(frozen=True)
class EffectiveSettings:
    """Fully resolved settings of a room; every field has a value.

    The defaults here are the built-in deployment defaults; the ``[defaults]``
    section of the configuration overrides them.
    """

    language: str = "en-US"
    transcription_mode: Mode = Mode.AVAILABLE
    captions_mode: Mode = Mode.AVAILABLE
    trigger: Trigger = Trigger.MANUAL
    max_speech_caption_ms: int = 9000
    silence_duration_ms: int = 700
    interim_results: bool = True
    provider: str = "whisper"
    translation_languages: tuple[str, ...] = ()

    def as_room_settings(self) -> RoomSettings:
        """These settings as a layer with every field set."""
        return RoomSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def resolve(defaults: EffectiveSettings, *layers: RoomSettings) -> EffectiveSettings:
    """Apply ``layers`` over ``defaults`` in order, a later layer winning.

    Each layer is validated first, so a bad value raises :class:`SettingError`
    even when a later layer would have overridden it. ``defaults`` is trusted
    (:func:`load_config` validated it).
    """
    result = defaults
    for layer in layers:
        result = dataclasses.replace(result, **layer.validate().set_fields())
    return result


# ---------------------------------------------------------------------------
# Proto conversion

_MODE_TO_PROTO: dict[Mode, captions_pb2.Mode.ValueType] = {
    Mode.DISABLED: captions_pb2.MODE_DISABLED,
    Mode.AVAILABLE: captions_pb2.MODE_AVAILABLE,
    Mode.AUTO_ON: captions_pb2.MODE_AUTO_ON,
}
_MODE_FROM_PROTO: dict[int, Mode] = {number: mode for mode, number in _MODE_TO_PROTO.items()}
_TRIGGER_TO_PROTO: dict[Trigger, captions_pb2.Trigger.ValueType] = {
    Trigger.MANUAL: captions_pb2.TRIGGER_MANUAL,
    Trigger.AUTOMATIC: captions_pb2.TRIGGER_AUTOMATIC,
    Trigger.AUTOMATIC_2ND_PARTICIPANT: captions_pb2.TRIGGER_AUTOMATIC_2ND_PARTICIPANT,
}
_TRIGGER_FROM_PROTO: dict[int, Trigger] = {
    number: trigger for trigger, number in _TRIGGER_TO_PROTO.items()
}


def mode_from_proto(value: int, field: str = "mode") -> Mode | None:
    """Convert a ``captions.v1.Mode`` number; MODE_UNSPECIFIED gives None.

    proto3 enums are open, so a newer client can send a number this build
    does not know: that raises :class:`SettingError` for ``field``.
    """
    if value == captions_pb2.MODE_UNSPECIFIED:
        return None
    try:
        return _MODE_FROM_PROTO[value]
    except KeyError:
        raise SettingError(
            field, f"{value} is not a valid Mode (1..{len(_MODE_TO_PROTO)}, 0 for unset)"
        ) from None


def mode_to_proto(mode: Mode | str | None) -> captions_pb2.Mode.ValueType:
    """Convert a mode to its ``captions.v1.Mode`` number; None gives MODE_UNSPECIFIED."""
    if mode is None:
        return captions_pb2.MODE_UNSPECIFIED
    return _MODE_TO_PROTO[_check_mode("mode", mode)]


def trigger_from_proto(value: int, field: str = "trigger") -> Trigger | None:
    """Convert a ``captions.v1.Trigger`` number; TRIGGER_UNSPECIFIED gives None.

    A number this build does not know raises :class:`SettingError`.
    """
    if value == captions_pb2.TRIGGER_UNSPECIFIED:
        return None
    try:
        return _TRIGGER_FROM_PROTO[value]
    except KeyError:
        raise SettingError(
            field, f"{value} is not a valid Trigger (1..{len(_TRIGGER_TO_PROTO)}, 0 for unset)"
        ) from None


def trigger_to_proto(trigger: Trigger | str | None) -> captions_pb2.Trigger.ValueType:
    """Convert a trigger to its ``captions.v1.Trigger`` number; None gives TRIGGER_UNSPECIFIED."""
    if trigger is None:
        return captions_pb2.TRIGGER_UNSPECIFIED
    return _TRIGGER_TO_PROTO[_check_trigger("trigger", trigger)]


def settings_from_proto(msg: captions_pb2.Settings) -> RoomSettings:
    """Convert a ``captions.v1.Settings`` message into a validated layer.

    Only fields present on the wire are set. An empty ``translation_languages``
    reads as "not set", because a repeated field cannot tell empty from absent.
    Raises :class:`SettingError` for any bad value.
    """
    settings = RoomSettings(
        language=msg.language if msg.HasField("language") else None,
        transcription_mode=(
            mode_from_proto(msg.transcription_mode, "transcription_mode")
            if msg.HasField("transcription_mode")
            else None
        ),
        captions_mode=(
            mode_from_proto(msg.captions_mode, "captions_mode")
            if msg.HasField("captions_mode")
            else None
        ),
        trigger=trigger_from_proto(msg.trigger) if msg.HasField("trigger") else None,
        max_speech_caption_ms=(
            msg.max_speech_caption_ms if msg.HasField("max_speech_caption_ms") else None
        ),
        silence_duration_ms=(
            msg.silence_duration_ms if msg.HasField("silence_duration_ms") else None
        ),
        interim_results=msg.interim_results if msg.HasField("interim_results") else None,
        provider=msg.provider if msg.HasField("provider") else None,
        translation_languages=tuple(msg.translation_languages) or None,
    )
    return settings.validate()


def settings_to_proto(s: EffectiveSettings | RoomSettings) -> captions_pb2.Settings:
    """Convert settings into a ``captions.v1.Settings`` message.

    Every field of :class:`EffectiveSettings` is written; of a
    :class:`RoomSettings`, only the fields that are set.
    """
    values = s.as_room_settings() if isinstance(s, EffectiveSettings) else s
    msg = captions_pb2.Settings()
    if values.language is not None:
        msg.language = values.language
    if values.transcription_mode is not None:
        msg.transcription_mode = mode_to_proto(values.transcription_mode)
    if values.captions_mode is not None:
        msg.captions_mode = mode_to_proto(values.captions_mode)
    if values.trigger is not None:
        msg.trigger = trigger_to_proto(values.trigger)
    if values.max_speech_caption_ms is not None:
        msg.max_speech_caption_ms = values.max_speech_caption_ms
    if values.silence_duration_ms is not None:
        msg.silence_duration_ms = values.silence_duration_ms
    if values.interim_results is not None:
        msg.interim_results = values.interim_results
    if values.provider is not None:
        msg.provider = values.provider
    if values.translation_languages:
        msg.translation_languages.extend(values.translation_languages)
    return msg


# ---------------------------------------------------------------------------
# Deployment configuration

BUNDLED_WHISPER_MODELS: tuple[str, ...] = ("tiny.en", "base")
"""Model names that need no path: tiny.en (English) and multilingual base."""
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
COMPUTE_TYPES: tuple[str, ...] = (
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)
"""CTranslate2 compute types."""
STORAGE_BACKENDS: tuple[str, ...] = ("local", "s3")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: tuple[str, ...] = ("json", "text")

_SPEC = "captions_config_spec"


@dataclass(frozen=True, slots=True)
class _Spec:
    """How a configuration key is typed and checked."""

    kind: str  # "str", "int", "bool", "path" or "list"
    optional: bool = False  # may be unset (None); an empty env value unsets it
    bounds: tuple[int, int] | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns a problem or None


def _key(
    default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **spec: Any
) -> Any:
    """A dataclass field carrying its configuration spec."""
    metadata = {_SPEC: _Spec(**spec)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"{shown(value)} is not HOST:PORT (port 0..65535, e.g. 127.0.0.1:8088 or [::]:8088)"
    return None


def _check_nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _check_token(value: str) -> str | None:
    # The token travels as "authorization: Bearer <token>".
    if not value or any(c.isspace() for c in value):
        return "must be non-empty and contain no whitespace"
    return None


def _default_workers() -> int:
    return min(64, max(1, os.cpu_count() or 1))


@dataclass
class ServerConfig:
    """``[server]``: listeners and the API token."""

    grpc_listen: str = _key("127.0.0.1:50051", kind="str", check=_check_listen)
    http_listen: str = _key("127.0.0.1:8088", kind="str", check=_check_listen)
    token: str | None = _key(None, kind="str", optional=True, check=_check_token)
    token_file: Path | None = _key(None, kind="path", optional=True)
    allow_origin: str | None = _key(None, kind="str", optional=True, check=_check_nonempty)

    def require_token(self) -> str:
        """The API token; raises ConfigError when neither token nor token_file gave one."""
        if not self.token:
            raise ConfigError(
                "configuration",
                "server.token",
                "is required to serve: set token, token_file, CAPTIONS_SERVER_TOKEN "
                "or CAPTIONS_SERVER_TOKEN_FILE",
            )
        return self.token


@dataclass
class StoreConfig:
    """``[store]``: where transcripts are written."""

    store_dir: Path = _key(Path("./transcripts"), kind="path")
    storage: str = _key("local", kind="str", choices=STORAGE_BACKENDS)


@dataclass
class WhisperConfig:
    """``[whisper]``: the local recogniser."""

    whisper_model: str = _key("tiny.en", kind="str", check=_check_nonempty)
    whisper_model_multilingual: str = _key("base", kind="str", check=_check_nonempty)
    device: str = _key("cpu", kind="str", choices=DEVICES)
    compute_type: str = _key("int8", kind="str", choices=COMPUTE_TYPES)
    workers: int = _key(factory=_default_workers, kind="int", bounds=(1, 64))
    cpu_threads: int = _key(0, kind="int", bounds=(0, 256))  # 0: CTranslate2 decides
    beam_size: int = _key(1, kind="int", bounds=(1, 10))
    model_cache_dir: Path = _key(
        factory=lambda: Path("~/.cache/jitsi-captions").expanduser(), kind="path"
    )


@dataclass
class LimitsConfig:
    """``[limits]``: caps that protect the host from overload and abuse."""

    max_rooms: int = _key(200, kind="int", bounds=(1, 100_000))
    # participants sending audio (silent listeners included: they cost little)
    max_speakers_per_room: int = _key(500, kind="int", bounds=(1, 10_000))
    # Opus packets are at most 1275 bytes per frame; 4000 leaves room for
    # multi-frame packets while rejecting garbage early.
    max_frame_bytes: int = _key(4000, kind="int", bounds=(256, 65_536))
    max_subscribers_per_room: int = _key(20, kind="int", bounds=(1, 10_000))


def _check_path_prefix(value: str) -> str | None:
    if not value.startswith("/") or value.endswith("/") or " " in value:
        return f"{shown(value)} must start with '/', not end with '/', and have no spaces"
    return None


def _check_listen_or_off(value: str) -> str | None:
    return None if value == "" else _check_listen(value)


@dataclass
class IngestConfig:
    """``[ingest]``: where audio comes in."""

    # WebSocket for the videobridge's media export (Jicofo's transcription
    # url-template points at http(s)://HOST:PORT<mediajson_path>/{{MEETING_ID}})
    mediajson_path: str = _key("/mediajson", kind="str", check=_check_path_prefix)
    # Jigasi-compatible endpoint (skynet's streaming-whisper route)
    skynet_path: str = _key("/streaming-whisper/ws", kind="str", check=_check_path_prefix)
    # plain RTP over UDP; "" switches it off
    rtp_listen: str = _key("", kind="str", check=_check_listen_or_off)
    # bearer token the videobridge / Jigasi send; unset: the server token
    token: str | None = _key(None, kind="str", optional=True, check=_check_token)
    max_message_bytes: int = _key(65_536, kind="int", bounds=(1024, 16 * 1024 * 1024))
    max_messages_per_second: int = _key(5000, kind="int", bounds=(10, 1_000_000))
    # the bridge connecting starts captions and transcription in its room
    auto_start: bool = _key(True, kind="bool")
    # Jigasi authenticates with an RS256 JWT (ASAP); public keys here, named
    # <sha256 hex of kid>.pem or <kid>.pem. Unset: only the shared token.
    jigasi_public_keys_dir: Path | None = _key(None, kind="path", optional=True)
    jigasi_audience: str = _key("jitsi", kind="str", check=_check_nonempty)
    # a room with captions or transcription on that gets no audio from any
    # ingest this many seconds after the start gets a warning (status, log,
    # a message to the moderator); 0 switches it off
    no_audio_warning_s: int = _key(10, kind="int", bounds=(0, 600))


def _check_fingerprint(value: str) -> str | None:
    text = value.strip().lower().replace(":", "")
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return None
    return (
        f"{value[:100]!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed; "
        "openssl x509 -noout -fingerprint -sha256 -in CERT prints it)"
    )


@dataclass
class XmppConfig:
    """``[xmpp]``: the hidden transcriber occupant that posts captions to rooms."""

    enabled: bool = _key(False, kind="bool")
    # the transcriber account on the hidden domain (config.js hiddenDomain)
    jid: str = _key("transcriber@recorder.localhost", kind="str", check=_check_nonempty)
    password: str | None = _key(None, kind="str", optional=True)
    password_file: Path | None = _key(None, kind="path", optional=True)
    host: str = _key("", kind="str")  # "" resolves the JID's domain
    port: int = _key(5222, kind="int", bounds=(1, 65535))
    nick: str = _key("Transcriber", kind="str", check=_check_nonempty)
    starttls: bool = _key(True, kind="bool")
    # trust for the server's certificate; neither set: the system CAs.
    # ca_file: PEM file (e.g. the Prosody certificate of a stock install,
    # /etc/prosody/certs/<domain>.crt); pinned_cert_sha256: the SHA-256
    # fingerprint of the server's certificate, hex, colons optional
    ca_file: Path | None = _key(None, kind="path", optional=True)
    pinned_cert_sha256: str | None = _key(None, kind="str", optional=True, check=_check_fingerprint)
    # the name the certificate must carry when it is not the JID's domain
    tls_server_name: str | None = _key(None, kind="str", optional=True, check=_check_nonempty)
    send_text: bool = _key(False, kind="bool")
    # "{room}" and "{transcript_id}" are filled in; "" sends no link
    advertise_url: str = _key("", kind="str")

    def require_password(self) -> str:
        if self.password:
            return self.password
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as e:
                raise ConfigError("configuration", "xmpp.password_file", str(e)) from e
        raise ConfigError("configuration", "xmpp.password", "is required when xmpp.enabled is true")


@dataclass
class LoggingConfig:
    """``[logging]``."""

    log_level: str = _key("info", kind="str", choices=LOG_LEVELS)
    log_format: str = _key("json", kind="str", choices=LOG_FORMATS)


def _check_http_url_or_empty(value: str) -> str | None:
    if value and not (value.startswith("http://") or value.startswith("https://")):
        return f"{value!r} must be an http:// or https:// URL (or empty)"
    return None


def _check_retention_rooms(value: tuple[str, ...]) -> str | None:
    for item in value:
        room, sep, days = item.rpartition("=")
        if not sep or not room.strip() or not days.strip().isdigit():
            return f'{item!r} is not ROOM=DAYS (e.g. "board@conference.example.org=0")'
        if int(days) > 36500:
            return f"{item!r}: days must be 0..36500"
    return None


def _check_link_key(value: str) -> str | None:
    if len(value) < 32:
        return "must be at least 32 characters (e.g. the output of `openssl rand -hex 32`)"
    return None


@dataclass
class S3Config:
    """``[s3]``: an S3-compatible bucket (AWS, MinIO, Ceph...) for finished transcripts.

    Used when ``store.storage = "s3"``. The local directory stays the source
    of truth while a session runs; finished files are uploaded once. Keys
    unset here fall back to boto3's own chain (``AWS_ACCESS_KEY_ID``...).
    """

    bucket: str = _key("", kind="str")
    endpoint_url: str = _key("", kind="str", check=_check_http_url_or_empty)  # "": AWS
    region: str = _key("us-east-1", kind="str", check=_check_nonempty)
    prefix: str = _key("transcripts/", kind="str")
    access_key_id: str | None = _key(None, kind="str", optional=True)
    secret_access_key: str | None = _key(None, kind="str", optional=True)
    secret_access_key_file: Path | None = _key(None, kind="path", optional=True)
    addressing_style: str = _key("auto", kind="str", choices=("auto", "path", "virtual"))
    upload_retry_s: int = _key(60, kind="int", bounds=(1, 86_400))

    def require_secret(self) -> str | None:
        if self.secret_access_key:
            return self.secret_access_key
        if self.secret_access_key_file is not None:
            try:
                return self.secret_access_key_file.read_text().strip()
            except OSError as e:
                raise ConfigError("configuration", "s3.secret_access_key_file", str(e)) from e
        return None


@dataclass
class RetentionConfig:
    """``[retention]``: how long transcripts are kept, on every store."""

    days: int = _key(14, kind="int", bounds=(0, 36_500))  # 0: kept for ever
    # per-room overrides, "ROOM=DAYS" (0 keeps that room's transcripts)
    rooms: tuple[str, ...] = _key((), kind="list", check=_check_retention_rooms)
    sweep_interval_s: int = _key(3600, kind="int", bounds=(10, 86_400))

    def days_for(self, room: str) -> int:
        """The retention of ``room`` in days (0 = keep)."""
        name = room.lower()
        local = name.split("@", 1)[0]
        for item in self.rooms:
            r, _, days = item.rpartition("=")
            r = r.strip().lower()
            if r == name or ("@" not in r and r == local):
                return int(days)
        return self.days


@dataclass
class LinksConfig:
    """``[links]``: expiring signed links to a transcript's page and files.

    Set ``key`` (or ``key_file``) to switch links on; rotating the key
    revokes every link made with the old one. ``public_url`` is where
    participants reach this sidecar's HTTP listener (usually through the
    web server in front of Jitsi).
    """

    key: str | None = _key(None, kind="str", optional=True, check=_check_link_key)
    key_file: Path | None = _key(None, kind="path", optional=True)
    public_url: str = _key("", kind="str", check=_check_http_url_or_empty)
    ttl_days: int = _key(14, kind="int", bounds=(1, 3650))
    post_in_chat: bool = _key(True, kind="bool")

    def secret(self) -> bytes | None:
        """The signing key, or None when links are off."""
        if self.key:
            return self.key.encode()
        if self.key_file is not None:
            try:
                text = self.key_file.read_text().strip()
            except OSError as e:
                raise ConfigError("configuration", "links.key_file", str(e)) from e
            problem = _check_link_key(text)
            if problem:
                raise ConfigError("configuration", "links.key_file", f"the key {problem}")
            return text.encode()
        return None


WEBHOOK_NAME_RE = r"[a-z0-9][a-z0-9_-]{0,31}"


@dataclass(frozen=True)
class WebhookEndpoint:
    """One ``[[webhooks]]`` entry: where lifecycle events are POSTed.

    ``name`` labels its metrics and log lines (never the URL, which may hold
    credentials). ``events`` lists event types (``sidecar.room_events.EVENT_TYPES``);
    ``"*"`` means all but ``caption.interim``; the default is every lifecycle
    event (no captions).
    """

    name: str
    url: str
    secret: str
    events: frozenset[str]
    timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    max_age_s: float = 3 * 86_400.0  # then the message is dropped, with a log line

    def wants(self, event_type: str) -> bool:
        return event_type in self.events


_WEBHOOK_KEYS = (
    "name",
    "url",
    "secret",
    "secret_file",
    "events",
    "timeout_s",
    "backoff_initial_s",
    "backoff_max_s",
    "max_age_s",
)
_LIFECYCLE_EVENTS = (
    "transcription.started",
    "transcription.stopped",
    "transcription.ready",
    "transcription.failed",
    "captions.started",
    "captions.stopped",
    "captions.failed",
    "room.ended",
)
_ALL_EVENTS = (*_LIFECYCLE_EVENTS, "caption.final", "caption.interim")


def _read_webhooks(source: str, raw: object) -> tuple[WebhookEndpoint, ...]:
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(source, "webhooks", "must be an array of tables ([[webhooks]])")
    out: list[WebhookEndpoint] = []
    for n, table in enumerate(raw):
        where = f"webhooks[{n}]"
        for key in table:
            if key not in _WEBHOOK_KEYS:
                raise ConfigError(
                    source, f"{where}.{key}", f"unknown key (allowed: {', '.join(_WEBHOOK_KEYS)})"
                )
        name = table.get("name")
        if not isinstance(name, str) or not re.fullmatch(WEBHOOK_NAME_RE, name):
            raise ConfigError(source, f"{where}.name", f"{name!r} must match {WEBHOOK_NAME_RE}")
        where = f"webhooks[{name}]"
        if any(e.name == name for e in out):
            raise ConfigError(source, f"{where}.name", "is used by two endpoints")
        url = table.get("url")
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s]+", url):
            raise ConfigError(source, f"{where}.url", "must be an http:// or https:// URL")
        secret = table.get("secret")
        if secret is None and "secret_file" in table:
            try:
                secret = Path(str(table["secret_file"])).expanduser().read_text().strip()
            except OSError as e:
                raise ConfigError(source, f"{where}.secret_file", str(e)) from None
        if not isinstance(secret, str) or len(secret) < 16:
            raise ConfigError(
                source, f"{where}.secret", "is required, at least 16 characters (or secret_file)"
            )
        events_raw = table.get("events", list(_LIFECYCLE_EVENTS))
        if not isinstance(events_raw, list) or not all(isinstance(e, str) for e in events_raw):
            raise ConfigError(source, f"{where}.events", "must be a list of event types")
        events: set[str] = set()
        for wanted in events_raw:
            if wanted == "*":
                events.update(t for t in _ALL_EVENTS if t != "caption.interim")
            elif wanted in _ALL_EVENTS:
                events.add(wanted)
            else:
                raise ConfigError(
                    source,
                    f"{where}.events",
                    f"{wanted!r} is not one of *, {', '.join(_ALL_EVENTS)}",
                )
        nums: dict[str, float] = {}
        for key, default, lo, hi in (
            ("timeout_s", 10.0, 0.1, 300.0),
            ("backoff_initial_s", 1.0, 0.01, 3600.0),
            ("backoff_max_s", 300.0, 0.01, 86_400.0),
            ("max_age_s", 3 * 86_400.0, 1.0, 30 * 86_400.0),
        ):
            v = table.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise ConfigError(source, f"{where}.{key}", f"must be a number {lo}..{hi}")
            nums[key] = float(v)
        out.append(WebhookEndpoint(name, url, secret, frozenset(events), **nums))
    return tuple(out)


# The [defaults] section maps onto EffectiveSettings, checked by RoomSettings.
_DEFAULTS_SPECS: dict[str, _Spec] = {
    "language": _Spec("str"),
    "transcription_mode": _Spec("str"),
    "captions_mode": _Spec("str"),
    "trigger": _Spec("str"),
    "max_speech_caption_ms": _Spec("int"),
    "silence_duration_ms": _Spec("int"),
    "interim_results": _Spec("bool"),
    "provider": _Spec("str"),
    "translation_languages": _Spec("list"),
}


@dataclass
class SidecarConfig:
    """The deployment configuration, see :func:`load_config`."""

    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    whisper: WhisperConfig = field(default_factory=WhisperConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    xmpp: XmppConfig = field(default_factory=XmppConfig)
    defaults: EffectiveSettings = field(default_factory=EffectiveSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    s3: S3Config = field(default_factory=S3Config)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    links: LinksConfig = field(default_factory=LinksConfig)
    webhooks: tuple[WebhookEndpoint, ...] = ()
    config_path: Path | None = None  # the file it was read from, for the log
    # [azure], [google]: each cloud recogniser reads and checks its own section
    # (sidecar.asr.azure / sidecar.asr.google), with its CAPTIONS_<NAME>_* variables
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)
    provider_env: dict[str, str] = field(default_factory=dict)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "whisper": WhisperConfig,
    "limits": LimitsConfig,
    "ingest": IngestConfig,
    "xmpp": XmppConfig,
    "logging": LoggingConfig,
    "s3": S3Config,
    "retention": RetentionConfig,
    "links": LinksConfig,
}
_ENV_PREFIX = "CAPTIONS_"
_ENV_CONFIG = "CAPTIONS_CONFIG"
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _section_specs(section: str) -> dict[str, _Spec]:
    if section == "defaults":
        return _DEFAULTS_SPECS
    return {f.name: f.metadata[_SPEC] for f in dataclasses.fields(_SECTIONS[section])}


_ALL_SECTIONS = (*_SECTIONS, "defaults")
# sections owned by the recogniser adapters, passed to them as they are
PROVIDER_SECTIONS: tuple[str, ...] = tuple(p for p in PROVIDERS if p != "whisper")


def _describe(value: object) -> str:
    return f"{type(value).__name__} {shown(value)}"


def _from_toml(spec: _Spec, value: object) -> object:
    """Type-check a TOML value; returns the converted value or raises TypeError(message)."""
    if spec.kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"expected an integer, got {_describe(value)}")
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {_describe(value)}")
    if spec.kind == "str":
        if isinstance(value, str):
            return value.strip()
        raise TypeError(f"expected a string, got {_describe(value)}")
    if spec.kind == "path":
        if isinstance(value, str) and value.strip():
            return Path(value.strip()).expanduser()
        raise TypeError(f"expected a path string, got {_describe(value)}")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value)
    raise TypeError(f"expected a list of strings, got {_describe(value)}")


def _from_env(spec: _Spec, raw: str) -> object:
    """Convert an environment string; raises TypeError(message) when it does not parse."""
    text = raw.strip()
    if spec.optional and not text:
        return None
    if spec.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise TypeError(f"expected an integer, got {shown(raw)}") from None
    if spec.kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise TypeError(f"expected true/false, 1/0, yes/no or on/off, got {shown(raw)}")
    if spec.kind == "path":
        if not text:
            raise TypeError("expected a path, got an empty string")
        return Path(text).expanduser()
    if spec.kind == "list":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def _problem(spec: _Spec, value: object) -> str | None:
    """What is wrong with a typed value, or None."""
    if value is None:
        return None
    if spec.bounds is not None and isinstance(value, int):
        lo, hi = spec.bounds
        if not lo <= value <= hi:
            return f"{value} is out of range ({lo}..{hi})"
    if spec.choices is not None and isinstance(value, str) and value not in spec.choices:
        return f"{shown(value)} is not one of {', '.join(spec.choices)}"
    if spec.check is not None:
        return spec.check(value)
    return None


class _Value:
    """A configuration value with the source that set it, for error messages."""

    __slots__ = ("source", "value")

    def __init__(self, value: Any, source: str) -> None:
        self.value = value
        self.source = source


def _read_file(path: Path) -> dict[str, dict[str, _Value]]:
    source = f"config file {path}"
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "", "does not exist") from None
    except OSError as e:
        raise ConfigError(source, "", f"cannot be read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"is not valid TOML: {e}") from None
    sections = ", ".join(f"[{s}]" for s in (*_ALL_SECTIONS, *PROVIDER_SECTIONS)) + ", [[webhooks]]"
    result: dict[str, dict[str, _Value]] = {}
    if "webhooks" in data:
        # an array of tables, not a section of keys: kept whole under one key
        endpoints = _read_webhooks(source, data.pop("webhooks"))
        result["webhooks"] = {"endpoints": _Value(endpoints, source)}
    for section, table in data.items():
        if section in PROVIDER_SECTIONS:
            if not isinstance(table, dict):
                raise ConfigError(source, section, "must be a table")
            result[section] = {k: _Value(v, source) for k, v in table.items()}
            continue
        if section not in _ALL_SECTIONS:
            raise ConfigError(source, section, f"unknown section (allowed: {sections})")
        if not isinstance(table, dict):
            raise ConfigError(source, section, f"must be a table, one of {sections}")
        specs = _section_specs(section)
        values = result.setdefault(section, {})
        for key, raw in table.items():
            name = f"{section}.{key}"
            if key not in specs:
                raise ConfigError(source, name, f"unknown key (allowed: {', '.join(specs)})")
            try:
                value = _from_toml(specs[key], raw)
            except TypeError as e:
                raise ConfigError(source, name, str(e)) from None
            values[key] = _Value(value, source)
    return result


def _read_env(env: Mapping[str, str], into: dict[str, dict[str, _Value]]) -> None:
    for var in sorted(env):
        if not var.startswith(_ENV_PREFIX) or var == _ENV_CONFIG:
            continue
        rest = var[len(_ENV_PREFIX) :]
        for section in _ALL_SECTIONS:
            prefix = section.upper() + "_"
            if rest.startswith(prefix):
                break
        else:
            # Other components may own other CAPTIONS_* variables; only a
            # known section makes the variable ours.
            continue
        key = rest[len(prefix) :].lower()
        specs = _section_specs(section)
        source = f"environment variable {var}"
        name = f"{section}.{key}"
        if key not in specs:
            allowed = ", ".join(f"{_ENV_PREFIX}{prefix}{k.upper()}" for k in specs)
            raise ConfigError(source, name, f"unknown key (allowed: {allowed})")
        try:
            value = _from_env(specs[key], env[var])
        except TypeError as e:
            raise ConfigError(source, name, str(e)) from None
        into.setdefault(section, {})[key] = _Value(value, source)


def _build_section(section: str, values: dict[str, _Value]) -> Any:
    specs = _section_specs(section)
    for key, item in values.items():
        problem = _problem(specs[key], item.value)
        if problem is not None:
            raise ConfigError(item.source, f"{section}.{key}", problem)
    return _SECTIONS[section](**{key: item.value for key, item in values.items()})


def _build_defaults(values: dict[str, _Value]) -> EffectiveSettings:
    layer = RoomSettings(**{key: item.value for key, item in values.items()})
    try:
        return resolve(EffectiveSettings(), layer)
    except SettingError as e:
        item = values.get(e.field)
        source = item.source if item is not None else "configuration"
        raise ConfigError(source, f"defaults.{e.field}", e.message) from None


def _check_model(whisper: WhisperConfig, values: dict[str, _Value]) -> None:
    for key in ("whisper_model", "whisper_model_multilingual"):
        name = getattr(whisper, key)
        if name in BUNDLED_WHISPER_MODELS:
            continue
        if not Path(name).expanduser().is_dir():
            raise ConfigError(
                values[key].source,
                f"whisper.{key}",
                f"{shown(name, 200)} is neither a bundled model "
                f"({', '.join(BUNDLED_WHISPER_MODELS)}) "
                "nor the directory of a CTranslate2 model",
            )
    if whisper.whisper_model_multilingual == "tiny.en":
        raise ConfigError(
            values["whisper_model_multilingual"].source,
            "whisper.whisper_model_multilingual",
            "'tiny.en' is English-only; use 'base' or a multilingual model directory",
        )


def _read_token_file(server: ServerConfig, values: dict[str, _Value]) -> None:
    # An explicit token (from any source) wins, so an environment token can
    # override a token_file written in the file.
    if server.token or server.token_file is None:
        return
    source = values["token_file"].source
    try:
        token = server.token_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(
            source, "server.token_file", f"cannot read {server.token_file}: {e.strerror or e}"
        ) from None
    problem = _check_token(token)
    if problem is not None:
        raise ConfigError(
            source, "server.token_file", f"the token in {server.token_file} {problem}"
        )
    server.token = token


def _check_xmpp_tls(xmpp: XmppConfig, values: dict[str, _Value]) -> None:
    tls_keys = [k for k in ("ca_file", "pinned_cert_sha256", "tls_server_name") if k in values]
    if tls_keys and getattr(xmpp, tls_keys[0]) is not None and not xmpp.starttls:
        raise ConfigError(
            values[tls_keys[0]].source,
            f"xmpp.{tls_keys[0]}",
            "needs xmpp.starttls = true (without TLS there is no certificate to check)",
        )
    if xmpp.ca_file is None:
        return
    from sidecar.xmpp.tls import load_ca_file

    try:
        load_ca_file(xmpp.ca_file)
    except ValueError as e:
        raise ConfigError(values["ca_file"].source, "xmpp.ca_file", str(e)) from None


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> SidecarConfig:
    """Read the deployment configuration.

    Sources, later winning: built-in defaults, the TOML file (``path``, else
    the file named by ``CAPTIONS_CONFIG``, else none), then environment
    variables ``CAPTIONS_<SECTION>_<KEY>`` (e.g. ``CAPTIONS_SERVER_TOKEN``).
    ``env`` defaults to ``os.environ``. Environment values are converted from
    strings: integers, booleans (true/false, 1/0, yes/no, on/off), paths and
    comma-separated lists; an empty value unsets an optional key.

    A missing token is not an error here (tools that only read transcripts
    need none); servers call :meth:`ServerConfig.require_token`. Raises
    :class:`ConfigError` naming the file or variable, the key and what is
    allowed.
    """
    env = os.environ if env is None else env
    if path is None and env.get(_ENV_CONFIG, "").strip():
        path = Path(env[_ENV_CONFIG].strip()).expanduser()
    values = _read_file(path) if path is not None else {}
    _read_env(env, values)

    sections = {s: _build_section(s, values.get(s, {})) for s in _SECTIONS}
    server: ServerConfig = sections["server"]
    whisper: WhisperConfig = sections["whisper"]
    _read_token_file(server, values.get("server", {}))
    _check_model(whisper, values.get("whisper", {}))
    if sections["store"].storage == "s3" and not sections["s3"].bucket:
        item = values.get("store", {}).get("storage")
        raise ConfigError(
            item.source if item else "configuration",
            "s3.bucket",
            'is required when store.storage = "s3"',
        )
    _check_xmpp_tls(sections["xmpp"], values.get("xmpp", {}))
    return SidecarConfig(
        server=server,
        store=sections["store"],
        whisper=whisper,
        limits=sections["limits"],
        ingest=sections["ingest"],
        xmpp=sections["xmpp"],
        defaults=_build_defaults(values.get("defaults", {})),
        logging=sections["logging"],
        s3=sections["s3"],
        retention=sections["retention"],
        links=sections["links"],
        webhooks=values["webhooks"]["endpoints"].value if "webhooks" in values else (),
        config_path=path,
        providers={
            name: {k: v.value for k, v in values[name].items()}
            for name in PROVIDER_SECTIONS
            if name in values
        },
        provider_env={
            k: v
            for k, v in env.items()
            if any(k.startswith(f"{_ENV_PREFIX}{n.upper()}_") for n in PROVIDER_SECTIONS)
        },
    )
