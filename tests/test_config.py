"""Tests of room settings, their proto form and the deployment configuration."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.config import (
    LANGUAGES,
    ConfigError,
    EffectiveSettings,
    Mode,
    RoomSettings,
    SettingError,
    SidecarConfig,
    Trigger,
    canonical_language,
    is_english,
    load_config,
    mode_from_proto,
    mode_to_proto,
    resolve,
    settings_from_proto,
    settings_to_proto,
    trigger_from_proto,
    trigger_to_proto,
    whisper_language,
)
from sidecar.proto.captions.v1 import captions_pb2

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config.example.toml"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Languages


def test_languages_cover_the_required_codes() -> None:
    required = {
        "auto",
        "en-US", "en-GB", "pt-BR", "pt-PT", "zh-CN", "zh-TW", "nl-BE", "nl-NL",
        "fr-CA", "es-MX",
        "en", "de", "fr", "es", "it", "ja", "ko", "ru", "ar", "hi", "tr", "pl", "uk", "sv",
    }  # fmt: skip
    assert required <= set(LANGUAGES)
    assert len(LANGUAGES) == len(set(LANGUAGES))
    assert 40 <= len(LANGUAGES) - 1 <= 55


def test_every_language_is_one_whisper_knows() -> None:
    tokenizer = pytest.importorskip("faster_whisper.tokenizer")
    whisper_codes = set(getattr(tokenizer, "_LANGUAGE_CODES", ()))
    if not whisper_codes:
        pytest.skip("faster-whisper does not expose its language list")
    for code in LANGUAGES:
        if code != "auto":
            assert whisper_language(code) in whisper_codes, code


@pytest.mark.parametrize("code", [c for c in LANGUAGES])
def test_listed_codes_are_their_own_canonical_form(code: str) -> None:
    assert canonical_language(code) == code
    assert canonical_language(code.upper().replace("-", "_")) == code


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("PT_br", "pt-BR"),
        ("pt-br", "pt-BR"),
        ("EN-us", "en-US"),
        ("en_gb", "en-GB"),
        ("zh_tw", "zh-TW"),
        ("NL-be", "nl-BE"),
        ("De", "de"),
        (" fr-ca ", "fr-CA"),
        ("AUTO", "auto"),
        ("iw", "he"),
        ("iw-IL", "he"),
        ("no", "nb"),
        ("no-NO", "nb"),
        ("zh", "zh-CN"),
        ("zh-Hant", "zh-TW"),
    ],
)
def test_canonical_language(given: str, expected: str) -> None:
    assert canonical_language(given) == expected


@pytest.mark.parametrize("bad", ["", "xx", "en-XX", "english", "pt--br", "auto-US", "zh-HK"])
def test_unknown_language_is_a_setting_error(bad: str) -> None:
    with pytest.raises(SettingError) as info:
        canonical_language(bad)
    assert info.value.field == "language"
    assert str(info.value).startswith("language: ")
    # The message lists what is allowed.
    assert "en-US" in info.value.message and "pt-BR" in info.value.message


def test_canonical_language_names_the_field_it_checks() -> None:
    with pytest.raises(SettingError, match=r"^translation_languages: 'xx'"):
        canonical_language("xx", "translation_languages")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("en-US", "en"),
        ("en", "en"),
        ("pt-BR", "pt"),
        ("nb", "no"),
        ("no", "no"),
        ("he", "he"),
        ("iw", "he"),
        ("zh-CN", "zh"),
        ("zh-TW", "zh"),
        ("zh", "zh"),
        ("nl-BE", "nl"),
        ("auto", None),
        ("AUTO", None),
    ],
)
def test_whisper_language(code: str, expected: str | None) -> None:
    assert whisper_language(code) == expected


def test_whisper_language_rejects_unknown_codes() -> None:
    with pytest.raises(SettingError):
        whisper_language("xx")


@pytest.mark.parametrize(
    ("code", "expected"),
    [("en", True), ("en-US", True), ("EN_gb", True), ("de", False), ("auto", False), ("", False)],
)
def test_is_english(code: str, expected: bool) -> None:
    assert is_english(code) is expected


# ---------------------------------------------------------------------------
# Errors and enums


def test_setting_error_reads_field_then_message() -> None:
    e = SettingError("silence_duration_ms", "250 is out of range (300..2000)")
    assert isinstance(e, ValueError)
    assert e.field == "silence_duration_ms"
    assert e.message == "250 is out of range (300..2000)"
    assert str(e) == "silence_duration_ms: 250 is out of range (300..2000)"
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.field, copy.message, str(copy)) == (e.field, e.message, str(e))


def test_config_error_pickles() -> None:
    e = ConfigError("environment variable X", "server.token", "bad")
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.source, copy.key, copy.message, str(copy)) == (
        e.source,
        e.key,
        e.message,
        str(e),
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("disabled", Mode.DISABLED),
        ("AVAILABLE", Mode.AVAILABLE),
        ("auto-on", Mode.AUTO_ON),
        ("auto_on", Mode.AUTO_ON),
        ("Auto_On", Mode.AUTO_ON),
    ],
)
def test_mode_parse(given: str, expected: Mode) -> None:
    assert Mode.parse(given) is expected
    assert Mode(given) is expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("manual", Trigger.MANUAL),
        ("Automatic", Trigger.AUTOMATIC),
        ("automatic-2nd-participant", Trigger.AUTOMATIC_2ND_PARTICIPANT),
        ("AUTOMATIC_2ND_PARTICIPANT", Trigger.AUTOMATIC_2ND_PARTICIPANT),
    ],
)
def test_trigger_parse(given: str, expected: Trigger) -> None:
    assert Trigger.parse(given) is expected


def test_enum_values_are_the_wire_spellings() -> None:
    assert [m.value for m in Mode] == ["disabled", "available", "auto-on"]
    assert [t.value for t in Trigger] == ["manual", "automatic", "automatic-2nd-participant"]
    assert Mode.AUTO_ON == "auto-on"


def test_bad_enum_values_name_field_and_choices() -> None:
    with pytest.raises(SettingError) as info:
        Mode.parse("on", "captions_mode")
    assert str(info.value) == "captions_mode: 'on' is not one of disabled, available, auto-on"
    with pytest.raises(SettingError, match=r"^trigger: .*manual, automatic, automatic-2nd"):
        Trigger.parse("sometimes")


# ---------------------------------------------------------------------------
# Room settings


def test_empty_layer_validates_to_itself() -> None:
    assert RoomSettings().validate() == RoomSettings()
    assert RoomSettings().set_fields() == {}


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("max_speech_caption_ms", 4999, False),
        ("max_speech_caption_ms", 5000, True),
        ("max_speech_caption_ms", 10000, True),
        ("max_speech_caption_ms", 10001, False),
        ("silence_duration_ms", 299, False),
        ("silence_duration_ms", 300, True),
        ("silence_duration_ms", 2000, True),
        ("silence_duration_ms", 2001, False),
    ],
)
def test_range_bounds(field: str, value: int, ok: bool) -> None:
    kwargs: dict[str, Any] = {field: value}
    layer = RoomSettings(**kwargs)
    if ok:
        assert getattr(layer.validate(), field) == value
        return
    with pytest.raises(SettingError) as info:
        layer.validate()
    lo, hi = (5000, 10000) if field == "max_speech_caption_ms" else (300, 2000)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {value} is out of range ({lo}..{hi})"


def test_error_message_of_the_brief() -> None:
    with pytest.raises(SettingError) as info:
        RoomSettings(silence_duration_ms=250).validate()
    assert str(info.value) == "silence_duration_ms: 250 is out of range (300..2000)"


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"max_speech_caption_ms": True}, "max_speech_caption_ms", "5000..10000"),
        ({"silence_duration_ms": "700"}, "silence_duration_ms", "300..2000"),
        ({"interim_results": 1}, "interim_results", "true or false"),
        ({"provider": "aws"}, "provider", "whisper, azure, google"),
        ({"language": "klingon"}, "language", "en-US"),
        ({"transcription_mode": "sometimes"}, "transcription_mode", "auto-on"),
        ({"captions_mode": 3}, "captions_mode", "auto-on"),
        ({"trigger": "later"}, "trigger", "automatic-2nd-participant"),
        ({"translation_languages": ("de", "auto")}, "translation_languages", "auto"),
        ({"translation_languages": ("xx",)}, "translation_languages", "en-US"),
        ({"translation_languages": "de"}, "translation_languages", "list"),
    ],
)
def test_bad_values_name_field_and_what_is_allowed(
    kwargs: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(SettingError) as info:
        RoomSettings(**kwargs).validate()  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in info.value.message


def test_validate_canonicalises() -> None:
    raw = RoomSettings(
        language="pt_br",
        transcription_mode="AUTO_ON",  # type: ignore[arg-type]
        captions_mode=Mode.DISABLED,
        trigger="automatic_2nd_participant",  # type: ignore[arg-type]
        provider=" Azure ",
        translation_languages=("DE", "fr_ca", "de", "iw"),
        interim_results=False,
    )
    assert raw.validate() == RoomSettings(
        language="pt-BR",
        transcription_mode=Mode.AUTO_ON,
        captions_mode=Mode.DISABLED,
        trigger=Trigger.AUTOMATIC_2ND_PARTICIPANT,
        provider="azure",
        translation_languages=("de", "fr-CA", "he"),
        interim_results=False,
    )


def test_validate_accepts_every_provider() -> None:
    for provider in ("whisper", "azure", "google"):
        assert RoomSettings(provider=provider).validate().provider == provider


def test_merged_lets_set_fields_win() -> None:
    base = RoomSettings(language="de", silence_duration_ms=500, interim_results=True)
    over = RoomSettings(language="fr", interim_results=False, translation_languages=())
    assert base.merged(over) == RoomSettings(
        language="fr", silence_duration_ms=500, interim_results=False, translation_languages=()
    )
    assert base.merged(RoomSettings()) == base
    assert RoomSettings().merged(base) == base


def test_effective_defaults() -> None:
    d = EffectiveSettings()
    assert d == EffectiveSettings(
        language="en-US",
        transcription_mode=Mode.AVAILABLE,
        captions_mode=Mode.AVAILABLE,
        trigger=Trigger.MANUAL,
        max_speech_caption_ms=9000,
        silence_duration_ms=700,
        interim_results=True,
        provider="whisper",
        translation_languages=(),
    )
    assert d.as_room_settings().validate() == d.as_room_settings()


def test_resolve_precedence_defaults_room_start() -> None:
    defaults = EffectiveSettings(language="en-US", silence_duration_ms=700, provider="whisper")
    room = RoomSettings(language="de", silence_duration_ms=900, captions_mode=Mode.AUTO_ON)
    start = RoomSettings(language="fr-CA", interim_results=False)
    got = resolve(defaults, room, start)
    assert got.language == "fr-CA"  # start beats room beats defaults
    assert got.silence_duration_ms == 900  # room beats defaults
    assert got.captions_mode is Mode.AUTO_ON
    assert got.interim_results is False
    assert got.provider == "whisper"  # only the defaults set it
    assert got.max_speech_caption_ms == 9000
    # Order matters: the later layer wins.
    assert resolve(defaults, start, room).language == "de"
    assert resolve(defaults) == defaults


def test_resolve_canonicalises_layers() -> None:
    got = resolve(EffectiveSettings(), RoomSettings(language="ZH_tw", trigger="AUTOMATIC"))  # type: ignore[arg-type]
    assert got.language == "zh-TW"
    assert got.trigger is Trigger.AUTOMATIC


def test_resolve_validates_every_layer() -> None:
    # A bad value is reported even if a later layer would override it.
    with pytest.raises(SettingError, match="silence_duration_ms"):
        resolve(
            EffectiveSettings(),
            RoomSettings(silence_duration_ms=100),
            RoomSettings(silence_duration_ms=500),
        )


def test_explicit_empty_translation_list_clears_translations() -> None:
    defaults = EffectiveSettings(translation_languages=("de",))
    assert resolve(defaults, RoomSettings()).translation_languages == ("de",)
    assert resolve(defaults, RoomSettings(translation_languages=())).translation_languages == ()


# ---------------------------------------------------------------------------
# Proto conversion


def test_mode_and_trigger_proto_mapping() -> None:
    pairs = [
        (Mode.DISABLED, captions_pb2.MODE_DISABLED),
        (Mode.AVAILABLE, captions_pb2.MODE_AVAILABLE),
        (Mode.AUTO_ON, captions_pb2.MODE_AUTO_ON),
    ]
    for mode, number in pairs:
        assert mode_to_proto(mode) == number
        assert mode_from_proto(number) is mode
    assert mode_to_proto(None) == captions_pb2.MODE_UNSPECIFIED
    assert mode_from_proto(captions_pb2.MODE_UNSPECIFIED) is None
    assert mode_to_proto("auto_on") == captions_pb2.MODE_AUTO_ON

    tpairs = [
        (Trigger.MANUAL, captions_pb2.TRIGGER_MANUAL),
        (Trigger.AUTOMATIC, captions_pb2.TRIGGER_AUTOMATIC),
        (Trigger.AUTOMATIC_2ND_PARTICIPANT, captions_pb2.TRIGGER_AUTOMATIC_2ND_PARTICIPANT),
    ]
    for trigger, tnumber in tpairs:
        assert trigger_to_proto(trigger) == tnumber
        assert trigger_from_proto(tnumber) is trigger
    assert trigger_to_proto(None) == captions_pb2.TRIGGER_UNSPECIFIED
    assert trigger_from_proto(captions_pb2.TRIGGER_UNSPECIFIED) is None


def test_unknown_enum_numbers_are_setting_errors() -> None:
    with pytest.raises(SettingError, match=r"^captions_mode: 7 is not a valid Mode \(1\.\.3"):
        mode_from_proto(7, "captions_mode")
    with pytest.raises(SettingError, match=r"^trigger: 9 is not a valid Trigger \(1\.\.3"):
        trigger_from_proto(9)
    with pytest.raises(SettingError, match="transcription_mode"):
        settings_from_proto(captions_pb2.Settings(transcription_mode=7))  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="^trigger"):
        settings_from_proto(captions_pb2.Settings(trigger=4))  # type: ignore[arg-type]


def test_empty_message_is_an_empty_layer() -> None:
    assert settings_from_proto(captions_pb2.Settings()) == RoomSettings()


def test_unspecified_enums_are_unset() -> None:
    msg = captions_pb2.Settings(
        transcription_mode=captions_pb2.MODE_UNSPECIFIED,
        captions_mode=captions_pb2.MODE_UNSPECIFIED,
        trigger=captions_pb2.TRIGGER_UNSPECIFIED,
    )
    assert settings_from_proto(msg) == RoomSettings()


def test_explicit_zero_and_false_are_set() -> None:
    # HasField, not truthiness: false is a real value, 0 is a real (bad) value.
    assert settings_from_proto(captions_pb2.Settings(interim_results=False)) == RoomSettings(
        interim_results=False
    )
    with pytest.raises(SettingError, match=r"^max_speech_caption_ms: 0 is out of range"):
        settings_from_proto(captions_pb2.Settings(max_speech_caption_ms=0))


def test_settings_from_proto_validates_and_canonicalises() -> None:
    msg = captions_pb2.Settings(
        language="PT_br",
        captions_mode=captions_pb2.MODE_AUTO_ON,
        trigger=captions_pb2.TRIGGER_AUTOMATIC,
        silence_duration_ms=300,
        provider="google",
        translation_languages=["EN_gb", "de"],
    )
    assert settings_from_proto(msg) == RoomSettings(
        language="pt-BR",
        captions_mode=Mode.AUTO_ON,
        trigger=Trigger.AUTOMATIC,
        silence_duration_ms=300,
        provider="google",
        translation_languages=("en-GB", "de"),
    )
    with pytest.raises(SettingError, match=r"^silence_duration_ms: 2001 is out of range"):
        settings_from_proto(captions_pb2.Settings(silence_duration_ms=2001))


def test_effective_settings_round_trip_through_proto() -> None:
    s = EffectiveSettings(
        language="zh-TW",
        transcription_mode=Mode.DISABLED,
        captions_mode=Mode.AUTO_ON,
        trigger=Trigger.AUTOMATIC_2ND_PARTICIPANT,
        max_speech_caption_ms=5000,
        silence_duration_ms=2000,
        interim_results=False,
        provider="azure",
        translation_languages=("de", "fr-CA"),
    )
    msg = settings_to_proto(s)
    for name in (
        "language",
        "transcription_mode",
        "captions_mode",
        "trigger",
        "max_speech_caption_ms",
        "silence_duration_ms",
        "interim_results",
        "provider",
    ):
        assert msg.HasField(name), name  # type: ignore[arg-type]
    wire = captions_pb2.Settings.FromString(msg.SerializeToString())
    assert resolve(EffectiveSettings(), settings_from_proto(wire)) == s
    assert settings_from_proto(wire) == s.as_room_settings()


def test_room_settings_round_trip_keeps_unset_fields_unset() -> None:
    layer = RoomSettings(language="nl-BE", silence_duration_ms=450, interim_results=False)
    msg = settings_to_proto(layer)
    assert msg.HasField("language") and msg.HasField("silence_duration_ms")
    assert not msg.HasField("captions_mode")
    assert not msg.HasField("max_speech_caption_ms")
    assert not msg.HasField("provider")
    assert settings_from_proto(captions_pb2.Settings.FromString(msg.SerializeToString())) == layer


def test_default_effective_settings_to_proto() -> None:
    msg = settings_to_proto(EffectiveSettings())
    assert msg.language == "en-US"
    assert msg.transcription_mode == captions_pb2.MODE_AVAILABLE
    assert msg.trigger == captions_pb2.TRIGGER_MANUAL
    assert msg.max_speech_caption_ms == 9000
    assert msg.silence_duration_ms == 700
    assert msg.interim_results is True
    assert msg.provider == "whisper"
    assert list(msg.translation_languages) == []


# ---------------------------------------------------------------------------
# Deployment configuration


def test_no_file_no_env_gives_defaults() -> None:
    cfg = load_config(None, env={})
    assert cfg.config_path is None
    assert cfg.server.grpc_listen == "127.0.0.1:50051"
    assert cfg.server.http_listen == "127.0.0.1:8088"
    assert cfg.server.token is None
    assert cfg.server.allow_origin is None
    assert cfg.store.store_dir == Path("transcripts")
    assert cfg.store.storage == "local"
    assert cfg.whisper.whisper_model == "tiny.en"
    assert cfg.whisper.whisper_model_multilingual == "base"
    assert cfg.whisper.device == "cpu"
    assert cfg.whisper.compute_type == "int8"
    assert 1 <= cfg.whisper.workers <= 64
    assert cfg.whisper.cpu_threads == 0
    assert cfg.whisper.beam_size == 1
    assert cfg.whisper.model_cache_dir == Path.home() / ".cache" / "jitsi-captions"
    assert cfg.limits.max_rooms == 200
    assert cfg.limits.max_speakers_per_room == 500
    assert cfg.limits.max_frame_bytes == 4000
    assert cfg.limits.max_subscribers_per_room == 20
    assert cfg.ingest.mediajson_path == "/mediajson"
    assert cfg.ingest.rtp_listen == ""
    assert cfg.defaults == EffectiveSettings()
    assert cfg.logging.log_level == "info"
    assert cfg.logging.log_format == "json"
    assert cfg == SidecarConfig()


def test_example_file_loads_and_matches_the_defaults() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.config_path == EXAMPLE
    assert dataclasses.replace(cfg, config_path=None) == load_config(None, env={})


def test_example_file_lists_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    sections = {
        "server": config.ServerConfig,
        "store": config.StoreConfig,
        "whisper": config.WhisperConfig,
        "limits": config.LimitsConfig,
        "logging": config.LoggingConfig,
        "defaults": EffectiveSettings,
        "s3": config.S3Config,
        "retention": config.RetentionConfig,
        "links": config.LinksConfig,
    }
    for section, cls in sections.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):
            assert f"{f.name} = " in text, f"{section}.{f.name} missing from the example"


def test_file_values_are_read(tmp_path: Path) -> None:
    token_path = write(tmp_path, "  s3cret-token\n", "token")
    path = write(
        tmp_path,
        f"""
[server]
grpc_listen = "0.0.0.0:6000"
http_listen = "[::]:0"
token_file = "{token_path}"
allow_origin = "https://meet.example.com"

[store]
store_dir = "{tmp_path / "t"}"

[whisper]
device = "auto"
compute_type = "float16"
workers = 64
cpu_threads = 4
beam_size = 10
whisper_model = "base"
whisper_model_multilingual = "{tmp_path}"

[limits]
max_rooms = 1
max_subscribers_per_room = 7

[defaults]
language = "pt_br"
captions_mode = "AUTO_ON"
trigger = "automatic-2nd-participant"
interim_results = false
translation_languages = ["de", "EN_gb"]

[logging]
log_level = "debug"
log_format = "text"
""",
    )
    cfg = load_config(path, env={})
    assert cfg.config_path == path
    assert cfg.server.grpc_listen == "0.0.0.0:6000"
    assert cfg.server.http_listen == "[::]:0"
    assert cfg.server.token == "s3cret-token"
    assert cfg.server.require_token() == "s3cret-token"
    assert cfg.server.allow_origin == "https://meet.example.com"
    assert cfg.store.store_dir == tmp_path / "t"
    assert (cfg.whisper.device, cfg.whisper.compute_type) == ("auto", "float16")
    assert (cfg.whisper.workers, cfg.whisper.cpu_threads, cfg.whisper.beam_size) == (64, 4, 10)
    assert cfg.whisper.whisper_model_multilingual == str(tmp_path)
    assert (cfg.limits.max_rooms, cfg.limits.max_subscribers_per_room) == (1, 7)
    assert cfg.limits.max_speakers_per_room == 500
    assert cfg.defaults == EffectiveSettings(
        language="pt-BR",
        captions_mode=Mode.AUTO_ON,
        trigger=Trigger.AUTOMATIC_2ND_PARTICIPANT,
        interim_results=False,
        translation_languages=("de", "en-GB"),
    )
    assert (cfg.logging.log_level, cfg.logging.log_format) == ("debug", "text")


def test_env_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
token = "from-file"
allow_origin = "*"
[whisper]
workers = 2
[defaults]
language = "de"
interim_results = true
translation_languages = ["fr"]
""",
    )
    env = {
        "CAPTIONS_SERVER_TOKEN": "from-env",
        "CAPTIONS_SERVER_ALLOW_ORIGIN": "",  # empty unsets an optional key
        "CAPTIONS_WHISPER_WORKERS": " 3 ",
        "CAPTIONS_DEFAULTS_LANGUAGE": "en_gb",
        "CAPTIONS_DEFAULTS_INTERIM_RESULTS": "no",
        "CAPTIONS_DEFAULTS_TRANSLATION_LANGUAGES": "de, pt-br,,",
        "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "x"),
        "CAPTIONS_LIMITS_MAX_ROOMS": "10",
        "CAPTIONS_LOGGING_LOG_FORMAT": "text",
        # Variables of other components, not ours:
        "CAPTIONS_AZURE_KEY": "whatever",
        "PATH": "/usr/bin",
    }
    cfg = load_config(path, env=env)
    assert cfg.server.token == "from-env"
    assert cfg.server.allow_origin is None
    assert cfg.whisper.workers == 3
    assert cfg.defaults.language == "en-GB"
    assert cfg.defaults.interim_results is False
    assert cfg.defaults.translation_languages == ("de", "pt-BR")
    assert cfg.store.store_dir == tmp_path / "x"
    assert cfg.limits.max_rooms == 10
    assert cfg.logging.log_format == "text"


def test_config_file_named_by_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[logging]\nlog_level = "warning"\n')
    cfg = load_config(None, env={"CAPTIONS_CONFIG": str(path)})
    assert cfg.config_path == path
    assert cfg.logging.log_level == "warning"
    # An explicit path wins over CAPTIONS_CONFIG.
    other = write(tmp_path, '[logging]\nlog_level = "error"\n', "other.toml")
    assert load_config(other, env={"CAPTIONS_CONFIG": str(path)}).logging.log_level == "error"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("No", False),
        ("off", False),
    ],
)
def test_env_booleans(raw: str, expected: bool) -> None:
    cfg = load_config(None, env={"CAPTIONS_DEFAULTS_INTERIM_RESULTS": raw})
    assert cfg.defaults.interim_results is expected


def test_env_token_beats_token_file(tmp_path: Path) -> None:
    path = write(tmp_path, f'[server]\ntoken_file = "{tmp_path / "missing"}"\n')
    cfg = load_config(path, env={"CAPTIONS_SERVER_TOKEN": "abc"})
    assert cfg.server.token == "abc"
    with pytest.raises(ConfigError, match=r"server\.token_file: cannot read"):
        load_config(path, env={})


def test_token_file_from_env(tmp_path: Path) -> None:
    token = write(tmp_path, "tok\n", "token")
    cfg = load_config(None, env={"CAPTIONS_SERVER_TOKEN_FILE": str(token)})
    assert cfg.server.token == "tok"
    assert cfg.server.token_file == token


def test_empty_token_file_is_an_error(tmp_path: Path) -> None:
    token = write(tmp_path, "\n", "token")
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"CAPTIONS_SERVER_TOKEN_FILE": str(token)})
    assert info.value.source == "environment variable CAPTIONS_SERVER_TOKEN_FILE"
    assert info.value.key == "server.token_file"


def test_require_token() -> None:
    cfg = load_config(None, env={})
    with pytest.raises(ConfigError, match=r"server\.token: is required"):
        cfg.server.require_token()
    with pytest.raises(ConfigError, match="whitespace"):
        load_config(None, env={"CAPTIONS_SERVER_TOKEN": "two words"})


@pytest.mark.parametrize(
    ("section", "key", "bounds"),
    [
        ("whisper", "workers", (1, 64)),
        ("whisper", "cpu_threads", (0, 256)),
        ("whisper", "beam_size", (1, 10)),
        ("limits", "max_rooms", (1, 100_000)),
        ("limits", "max_speakers_per_room", (1, 10_000)),
        ("limits", "max_frame_bytes", (256, 65_536)),
        ("limits", "max_subscribers_per_room", (1, 10_000)),
        ("ingest", "max_messages_per_second", (10, 1_000_000)),
        ("defaults", "max_speech_caption_ms", (5000, 10000)),
        ("defaults", "silence_duration_ms", (300, 2000)),
    ],
)
def test_config_range_bounds(
    tmp_path: Path, section: str, key: str, bounds: tuple[int, int]
) -> None:
    lo, hi = bounds
    var = f"CAPTIONS_{section.upper()}_{key.upper()}"
    for ok in (lo, hi):
        cfg = load_config(None, env={var: str(ok)})
        obj = cfg.defaults if section == "defaults" else getattr(cfg, section)
        assert getattr(obj, key) == ok
        path = write(tmp_path, f"[{section}]\n{key} = {ok}\n")
        assert getattr(getattr(load_config(path, env={}), section), key) == ok
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ConfigError) as info:
            load_config(None, env={var: str(bad)})
        assert str(info.value) == (
            f"environment variable {var}: {section}.{key}: {bad} is out of range ({lo}..{hi})"
        )
        path = write(tmp_path, f"[{section}]\n{key} = {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert str(info.value) == (
            f"config file {path}: {section}.{key}: {bad} is out of range ({lo}..{hi})"
        )


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ('[whisper]\nworkers = "4"', "whisper.workers", "expected an integer, got str '4'"),
        ("[whisper]\nbeam_size = 1.5", "whisper.beam_size", "expected an integer"),
        ("[whisper]\nbeam_size = true", "whisper.beam_size", "expected an integer"),
        ('[defaults]\ninterim_results = "yes"', "defaults.interim_results", "true or false"),
        ('[defaults]\ntranslation_languages = "de"', "defaults.translation_languages", "list"),
        ("[server]\ntoken = 5", "server.token", "expected a string"),
        ('[server]\nport = "1"', "server.port", "allowed: grpc_listen, http_listen"),
        ('[server]\ngrpc_listen = "localhost"', "server.grpc_listen", "HOST:PORT"),
        ('[server]\nhttp_listen = "h:70000"', "server.http_listen", "0..65535"),
        ('[whisper]\ndevice = "tpu"', "whisper.device", "cpu, cuda, auto"),
        ('[whisper]\ncompute_type = "int4"', "whisper.compute_type", "int8"),
        ('[whisper]\nwhisper_model = "small"', "whisper.whisper_model", "tiny.en, base"),
        (
            '[whisper]\nwhisper_model_multilingual = "tiny.en"',
            "whisper.whisper_model_multilingual",
            "English-only",
        ),
        ('[store]\nstorage = "ftp"', "store.storage", "local, s3"),
        ('[logging]\nlog_level = "verbose"', "logging.log_level", "debug, info"),
        ('[logging]\nlog_format = "xml"', "logging.log_format", "json, text"),
        ('[defaults]\nlanguage = "xx"', "defaults.language", "en-US"),
        ('[defaults]\nprovider = "aws"', "defaults.provider", "whisper, azure, google"),
        ('[defaults]\ntrigger = "never"', "defaults.trigger", "automatic-2nd-participant"),
        ("[defaults]\nfoo = 1", "defaults.foo", "allowed: language"),
        ("[extra]\nfoo = 1", "extra", "unknown section"),
        ('server = "x"', "server", "must be a table"),
    ],
)
def test_file_errors_name_file_key_and_allowed(
    tmp_path: Path, toml: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.source == f"config file {path}"
    assert info.value.key == key
    assert str(info.value).startswith(f"config file {path}: {key}: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "key", "fragment"),
    [
        ("CAPTIONS_WHISPER_WORKERS", "four", "whisper.workers", "expected an integer"),
        ("CAPTIONS_DEFAULTS_INTERIM_RESULTS", "maybe", "defaults.interim_results", "yes/no"),
        ("CAPTIONS_WHISPER_WORKER", "4", "whisper.worker", "CAPTIONS_WHISPER_WORKERS"),
        ("CAPTIONS_DEFAULTS_LANGUAGE", "xx", "defaults.language", "en-US"),
        ("CAPTIONS_DEFAULTS_CAPTIONS_MODE", "on", "defaults.captions_mode", "auto-on"),
        ("CAPTIONS_STORE_STORE_DIR", "", "store.store_dir", "path"),
    ],
)
def test_env_errors_name_variable_key_and_allowed(
    var: str, value: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={var: value})
    assert info.value.source == f"environment variable {var}"
    assert info.value.key == key
    assert fragment in str(info.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, env={"CAPTIONS_CONFIG": str(missing)})
    broken = write(tmp_path, "[server\n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_config(broken, env={})
    assert str(broken) in str(info.value)


def test_default_workers_follow_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.os, "cpu_count", lambda: 256)
    assert load_config(None, env={}).whisper.workers == 64
    monkeypatch.setattr(config.os, "cpu_count", lambda: None)
    assert load_config(None, env={}).whisper.workers == 1
    monkeypatch.setattr(config.os, "cpu_count", lambda: 6)
    assert load_config(None, env={}).whisper.workers == 6


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTIONS_CONFIG", raising=False)
    monkeypatch.setenv("CAPTIONS_LOGGING_LOG_LEVEL", "error")
    assert load_config().logging.log_level == "error"
