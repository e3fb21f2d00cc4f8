import shutil

import pytest
import torch

from mtlfast.data import speech

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng (system package) is not installed: apt-get install espeak-ng",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLFAST_CACHE", str(cache))
        return speech.spoken_digits(n_voices=2, reps=3, seed=0)


def test_shapes_labels_and_split(data):
    assert [t.name for t in data.tasks] == ["word", "voice", "speed"]
    assert [t.classes for t in data.tasks] == [10, 2, 3]
    # 10 words x 2 voices x 3 speeds, one repetition per split.
    assert (len(data.train), len(data.val), len(data.test)) == (60, 60, 60)
    assert data.input_shape == (1, speech.N_MELS, 104)
    assert torch.isfinite(data.train.x).all()
    for split in (data.train, data.test):
        assert sorted(split.y["word"].bincount().tolist()) == [6] * 10
        assert split.y["voice"].max() == 1 and split.y["speed"].max() == 2
    ids = [set(s.source.tolist()) for s in (data.train, data.val, data.test)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]


def test_utterances_are_speech_not_silence(data):
    # Per-band standardized log-mel: a real utterance has frames well above the noise floor.
    energy = data.test.x.mean(dim=2).squeeze(1)  # (N, frames)
    assert (energy.max(dim=1).values - energy.median(dim=1).values > 0.5).all()


def test_speed_bucket_changes_duration(data):
    # Slow utterances occupy more loud frames than fast ones.
    loud = (data.train.x.mean(dim=2).squeeze(1) > 0).float().sum(dim=1)
    slow = loud[data.train.y["speed"] == 0].mean()
    fast = loud[data.train.y["speed"] == 2].mean()
    assert slow > fast


def test_cached_reload_is_identical(cache, data, monkeypatch):
    monkeypatch.setenv("MTLFAST_CACHE", str(cache))
    monkeypatch.setattr(speech, "_generate", lambda *a: pytest.fail("cache was not used"))
    again = speech.spoken_digits(n_voices=2, reps=3, seed=0)
    assert torch.equal(again.test.x, data.test.x)


def test_mel_filterbank_partition():
    fb = speech.mel_filterbank()
    assert fb.shape == (speech.N_MELS, speech.N_FFT // 2 + 1)
    assert (fb >= 0).all() and (fb.max(dim=1).values > 0.5).all()


def test_missing_espeak_message(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(ImportError, match="apt-get install espeak-ng"):
        speech.espeak_binary()


def test_bad_arguments():
    with pytest.raises(ValueError, match="reps"):
        speech.spoken_digits(reps=2)
    with pytest.raises(ValueError, match="n_voices"):
        speech.spoken_digits(n_voices=0)
