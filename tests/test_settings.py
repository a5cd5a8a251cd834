import dataclasses

import pytest

from pipeline.settings import (CAPTION_REVISIONS, EMBEDDER_REVISIONS, MUSIC_REVISIONS, REPO_ROOT, Settings,
                               SettingsError, settings_table)


def test_defaults_are_the_documented_checkpoints():
    s = Settings.from_env({})
    assert s.caption_model == "Salesforce/blip-image-captioning-base"
    assert s.clip_model == "openai/clip-vit-base-patch32"
    assert s.music_model == "facebook/musicgen-small"
    assert s.embedder_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert s.device == "auto" and s.demo is False
    assert s.index_dir == str(REPO_ROOT / "index")


def test_default_checkpoints_resolve_to_pinned_commits_and_others_to_main():
    s = Settings.from_env({})
    assert s.revision_for("caption") == CAPTION_REVISIONS[s.caption_model]
    assert s.revision_for("music") == MUSIC_REVISIONS[s.music_model]
    assert s.revision_for("embedder") == EMBEDDER_REVISIONS[s.embedder_model]
    assert len(s.revision_for("clip")) == 40
    other = Settings.from_env({"I2M_CAPTION_MODEL": "Salesforce/blip-image-captioning-large"})
    assert other.revision_for("caption") == "main"
    pinned = Settings.from_env({"I2M_MUSIC_REVISION": "abc123"})
    assert pinned.revision_for("music") == "abc123"


def test_every_field_reads_its_environment_variable():
    env = {"I2M_DEMO": "yes", "I2M_DEVICE": "cpu", "I2M_MAX_DURATION": "12.5", "I2M_QUEUE_SIZE": "7",
           "I2M_CAPTION_INT8": "off", "I2M_MOOD_PREDICTOR": "mlp", "I2M_INDEX_DIR": "/data/idx", "HF_TOKEN": "hf_x"}
    s = Settings.from_env(env)
    assert (s.demo, s.device, s.max_duration_s, s.queue_size, s.caption_int8) == (True, "cpu", 12.5, 7, False)
    assert (s.mood_predictor, s.index_dir, s.hf_token) == ("mlp", "/data/idx", "hf_x")


@pytest.mark.parametrize("env, needle", [
    ({"I2M_MAX_DURATION": "abc"}, "I2M_MAX_DURATION"),
    ({"I2M_MAX_DURATION": "nan"}, "I2M_MAX_DURATION"),
    ({"I2M_QUEUE_SIZE": "0"}, "I2M_QUEUE_SIZE"),
    ({"I2M_DEVICE": "tpu"}, "I2M_DEVICE"),
    ({"I2M_DEMO": "maybe"}, "I2M_DEMO"),
    ({"I2M_MIN_DURATION": "20", "I2M_MAX_DURATION": "10", "I2M_DEFAULT_DURATION": "10"}, "I2M_MIN_DURATION"),
])
def test_bad_values_are_refused_with_the_variable_named(env, needle):
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env(env)


def test_the_token_never_appears_in_repr_or_errors():
    s = Settings.from_env({"HF_TOKEN": "hf_secret_value"})
    assert "hf_secret_value" not in repr(s)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"HF_TOKEN": "hf_secret_value", "I2M_THREADS": "many"})
    assert "hf_secret_value" not in str(info.value)


def test_readme_lists_every_setting_exactly_as_the_code_declares():
    readme = (REPO_ROOT / "README.md").read_text()
    assert settings_table() in readme, "README settings table is stale: run python -m pipeline.settings"
    for f in dataclasses.fields(Settings):
        assert f"`{f.metadata['env']}`" in readme


def test_replace_revalidates():
    s = Settings.from_env({})
    assert s.replace(max_duration_s=10.0, default_duration_s=5.0).max_duration_s == 10.0
    with pytest.raises(SettingsError):
        s.replace(queue_size=-1)


def test_the_runtime_runs_numpys_blas_on_one_thread():
    """An Analyze's song searches are numpy matrix-vector products; a team of BLAS threads left busy after them took
    the cores from the embedder's torch threads (pipeline.runtime.one_blas_thread)."""
    from threadpoolctl import ThreadpoolController

    from pipeline.runtime import resolve_runtime

    controller = ThreadpoolController()
    numpys = [c for c in controller.select(user_api="blas").lib_controllers if "numpy" in c.filepath]
    if not numpys:
        pytest.skip("numpy's BLAS is not one threadpoolctl can see")
    before = controller.info()
    try:
        controller.limit(limits=2, user_api="blas")
        resolve_runtime(Settings.from_env({}))
        assert all(c.num_threads == 1 for c in numpys)
    finally:
        controller.limit(limits=max(i["num_threads"] for i in before if i["user_api"] == "blas"), user_api="blas")
