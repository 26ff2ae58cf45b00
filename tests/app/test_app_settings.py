"""vfs.settings: what an instance may do, read from the environment; the hosted rules."""

from pathlib import Path

import pytest

from vfs.settings import Settings, is_remote, safe_cache_path


def test_defaults_are_a_local_instance_that_builds():
    s = Settings.from_env({})
    assert s == Settings(
        cache_dir=Path("caches"), hosted=False, allow_build=True, max_upload_mb=20, remote_caches=()
    )


def test_environment_values():
    s = Settings.from_env(
        {
            "VFS_CACHE_DIR": "/srv/caches",
            "VFS_ALLOW_BUILD": "no",
            "VFS_MAX_UPLOAD_MB": "5",
            "VFS_REMOTE_CACHES": " https://x.org/a.zarr , s3://bucket/b.zarr,",
        }
    )
    assert s.cache_dir == Path("/srv/caches") and not s.allow_build and s.max_upload_mb == 5
    assert s.remote_caches == ("https://x.org/a.zarr", "s3://bucket/b.zarr")


def test_hosted_never_builds():
    assert not Settings.from_env({"VFS_HOSTED": "1", "VFS_ALLOW_BUILD": "1"}).allow_build


@pytest.mark.parametrize(
    "env, name",
    [
        ({"VFS_HOSTED": "maybe"}, "VFS_HOSTED"),
        ({"VFS_MAX_UPLOAD_MB": "lots"}, "VFS_MAX_UPLOAD_MB"),
        ({"VFS_MAX_UPLOAD_MB": "0"}, "VFS_MAX_UPLOAD_MB"),
        ({"VFS_REMOTE_CACHES": "/etc/passwd"}, "VFS_REMOTE_CACHES"),
        ({"VFS_REMOTE_CACHES": "file:///etc/x.zarr"}, "VFS_REMOTE_CACHES"),
        ({"VFS_RAY_SHARDS": "²", "VFS_RAY_ADDRESS": "auto"}, "VFS_RAY_SHARDS"),  # a digit int() refuses
    ],
)
def test_malformed_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)


@pytest.mark.parametrize("name", ["demo", "demo.zarr", "chest_xray-lite0.blocks.5", " demo "])
def test_safe_cache_path_accepts_plain_names(tmp_path, name):
    path = safe_cache_path(tmp_path, name)
    assert path.parent == tmp_path and path.name.endswith(".zarr") and path.name.startswith(name.strip()[:4])


@pytest.mark.parametrize(
    "name", ["", ".zarr", "..", "../x", "a/b", "a\\b", "/etc/passwd", ".hidden", "-rf", "a b"]
)
def test_safe_cache_path_refuses_escapes(tmp_path, name):
    with pytest.raises(ValueError):
        safe_cache_path(tmp_path, name)


def test_is_remote():
    assert is_remote("https://x.org/c.zarr") and is_remote("s3://b/c.zarr") and is_remote("http://h/c")
    assert not is_remote("caches/c.zarr") and not is_remote("/abs/c.zarr") and not is_remote("file:///c.zarr")


def test_local_instance_accepts_every_model_spec():
    local = Settings()
    for spec in ("python:mymodels:build", "file:/anywhere/ckpt.pt?arch=resnet18", "timm:resnet18"):
        local.check_model_spec(spec)


def test_hosted_refuses_user_code_and_outside_checkpoints(tmp_path):
    hosted = Settings(cache_dir=tmp_path, hosted=True, allow_build=False)
    with pytest.raises(ValueError, match="python:"):
        hosted.check_model_spec("python:os:getcwd")
    with pytest.raises(ValueError, match="caches folder"):
        hosted.check_model_spec("file:/etc/ckpt.pt?arch=resnet18")
    with pytest.raises(ValueError, match="caches folder"):
        hosted.check_model_spec(f"file:{tmp_path}/../ckpt.pt?arch=resnet18")
    hosted.check_model_spec(f"file:{tmp_path}/edited.pt?arch=resnet18")
    hosted.check_model_spec("embedded:efficientnet_lite0")


def test_hosted_reads_no_dataset_outside_its_caches_folder(tmp_path):
    """A cache's dataset source is whoever built it's choice: a hosted app opened it (to size a
    query image for a mask painted on it), and a source of "/" listed the whole disk (security
    review). Hosted, only a dataset in the caches folder is opened."""
    hosted = Settings(cache_dir=tmp_path, hosted=True, allow_build=False)
    assert hosted.reads_dataset(str(tmp_path / "data" / "manifest.csv")) and hosted.reads_dataset(
        "embedded:skimage"
    )
    for elsewhere in ("/", "/etc", f"{tmp_path}/../data", "https://example.org/m.csv", "torchvision:CIFAR10"):
        assert not hosted.reads_dataset(elsewhere), elsewhere
    assert Settings(cache_dir=tmp_path).reads_dataset("/")  # one's own machine: any


def test_malformed_model_spec_is_a_value_error():
    with pytest.raises(ValueError):
        Settings().check_model_spec("resnet50")
