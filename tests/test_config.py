"""Config merging: defaults < TOML < CXRSR_* environment < flags; bad values name the key."""

from pathlib import Path

import pytest

from cxr_sr_node.config import AllowRule, ConfigError, NodeConfig, Peer, load_config


def test_defaults_without_anything():
    cfg = load_config(environ={})
    assert cfg == NodeConfig(device_uid=cfg.device_uid)
    assert cfg.ae_title == "CXRSR" and cfg.port == 11112 and cfg.series_idle_s == 5.0
    assert cfg.device_uid.startswith("2.25.")


def test_precedence_toml_env_flags(tmp_path: Path):
    toml = tmp_path / "node.toml"
    toml.write_text(
        'ae_title = "FROMTOML"\nport = 2000\nseries_idle_s = 1.5\ndest = "PACS@pacs.example:4242"\n'
        'allow = ["MODALITY", "ORTHANC@127.0.0.1"]\n[peers]\nORTHANC = "127.0.0.1:4242"\n'
    )
    cfg = load_config(toml_path=toml, environ={"CXRSR_PORT": "3000", "CXRSR_SERIES_IDLE_S": "2"},
                      flags={"port": 4000, "ae_title": None})
    assert cfg.ae_title == "FROMTOML"  # a flag left unset does not override
    assert cfg.port == 4000  # flag beats environment beats TOML
    assert cfg.series_idle_s == 2.0  # environment beats TOML
    assert cfg.dest == Peer("PACS", "pacs.example", 4242)
    assert cfg.allow == (AllowRule("MODALITY"), AllowRule("ORTHANC", "127.0.0.1"))
    assert cfg.peers == {"ORTHANC": Peer("ORTHANC", "127.0.0.1", 4242)}


def test_node_table_and_env_config_path(tmp_path: Path):
    toml = tmp_path / "n.toml"
    toml.write_text("[node]\nport = 5000\nreturn_to_sender = true\n")
    cfg = load_config(environ={"CXRSR_CONFIG": str(toml)})
    assert cfg.port == 5000 and cfg.return_to_sender is True


@pytest.mark.parametrize(
    ("environ", "flags", "message"),
    [
        ({"CXRSR_PORT": "eleven"}, {}, "port (from environment): expected int, got 'eleven'"),
        ({}, {"port": 70000}, "port (from command line): must be a TCP port"),
        ({}, {"dest": "ORTHANC@pacs"}, "dest (from command line): expected AE@HOST:PORT"),
        ({}, {"ae_title": "WAY_TOO_LONG_AE_TITLE"}, "ae_title (from command line): AE title must be 1-16"),
        ({"CXRSR_SERIES_IDLE_S": "-1"}, {}, "series_idle_s (from environment): must be >= 0"),
        ({"CXRSR_DEVICE": "tpu"}, {}, "device (from environment): expected auto, cpu or cuda"),
        ({}, {"allow": ("MODALITY@",)}, "'MODALITY@' names no host after '@'; write AE or AE@HOST"),
        ({"CXRSR_RETURN_TO_SENDER": "maybe"}, {}, "return_to_sender (from environment): expected bool"),
        ({"CXRSR_NO_SUCH_KEY": "1"}, {}, "no_such_key (from environment): unknown setting"),
        # settings that passed here and `check`, then failed every image after the model had run on it
        ({"CXRSR_TILE": "16"}, {}, "tile (from environment): must be at least 32"),
        ({"CXRSR_TILE": "32", "CXRSR_OVERLAP": "40"}, {}, "overlap (from environment): must be less than tile (32)"),
        ({"CXRSR_DEVICE_UID": "not a uid"}, {}, "device_uid (from environment): must be a DICOM UID"),
        ({"CXRSR_DEVICE_UID": "1." + "2" * 70}, {}, "device_uid (from environment): must be a DICOM UID"),
        ({"CXRSR_STATION_NAME": "RADIOLOGY-SR-NODE-01"}, {}, "station_name (from environment): written as SH"),
        ({}, {"institution_name": "x" * 65}, "institution_name (from command line): written as LO into every"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(environ, flags, message):
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ, flags=flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("allow = 5\n", 'allow (from {path}): expected a list of "AE" or "AE@HOST" strings, got 5'),
        ("allow = [5]\n", 'allow (from {path}): expected "AE" or "AE@HOST" strings, got 5'),
        ("[peers]\nX = 5\n", 'peers.X (from {path}): expected "HOST:PORT", got 5'),
        ("port = 99999\n", "port (from {path}): must be a TCP port"),
        ("peers = 5\n", 'peers (from {path}): expected a table of AE = "HOST:PORT" or a list'),
        ("peers = true\n", 'peers (from {path}): expected a table of AE = "HOST:PORT" or a list'),
        ("node = 5\n", "config: in {path}, node must be a table"),
    ],
)
def test_bad_toml_values_name_the_key_and_the_file(tmp_path: Path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(toml_path=path, environ={})
    assert message.format(path=path) in str(info.value)


def test_bad_toml_names_the_file(tmp_path: Path):
    toml = tmp_path / "bad.toml"
    toml.write_text("port = \n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(toml_path=toml, environ={})
    toml.write_text('port = "x"\n')
    with pytest.raises(ConfigError, match=r"port \(from .*bad.toml\): expected int"):
        load_config(toml_path=toml, environ={})


def test_config_is_frozen():
    cfg = load_config(environ={})
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_allow_rule_host_pinning():
    rule = AllowRule.parse("MODALITY@127.0.0.1")
    assert rule.matches("MODALITY", "127.0.0.1")
    assert not rule.matches("MODALITY", "10.0.0.9")
    assert not rule.matches("OTHER", "127.0.0.1")
    assert AllowRule.parse("ANY").matches("ANY", "10.1.2.3")


def test_shipped_example_toml_loads():
    example = Path(__file__).resolve().parents[1] / "deploy" / "cxr-sr-node.example.toml"
    cfg = load_config(toml_path=example, environ={})
    assert cfg.dest == Peer("ORTHANC", "pacs.example.org", 4242)
    assert cfg.peers["ORTHANC"] == Peer("ORTHANC", "10.0.0.5", 4242)
    assert AllowRule("ORTHANC", "10.0.0.5") in cfg.allow


def test_the_example_toml_lists_every_key_with_its_default():
    """README: every key is in the example with its default (the peers are examples; a few keys
    whose default depends on the host are shown commented out)."""
    import tomllib
    from dataclasses import fields

    from cxr_sr_node.config import NodeConfig

    example = Path(__file__).resolve().parents[1] / "deploy" / "cxr-sr-node.example.toml"
    text = example.read_text()
    written = tomllib.loads(text)
    cfg, default = load_config(toml_path=example, environ={}), NodeConfig()
    examples = {"dest", "allow", "peers"}
    assert {k for k in written if getattr(cfg, k) != getattr(default, k)} == examples
    commented = {f.name for f in fields(NodeConfig) if f.name not in written}
    assert all(f"# {name} = " in text for name in commented), commented


def test_min_tile_is_the_upscalers():
    """config refuses what the model's Upscaler would refuse at load time, and no more."""
    import inspect

    from cxr_sr_node.config import MIN_TILE
    from model.inference import Upscaler

    assert inspect.signature(Upscaler).parameters["min_tile"].default == MIN_TILE
