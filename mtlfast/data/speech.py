"""SpokenDigits: the ten digit words spoken by the espeak-ng synthesizer; word, voice, speed.

Every utterance is a real synthesizer output (espeak-ng, a Debian/Ubuntu system package):
each of the words "zero".."nine" is spoken by several voices (accent + voice variant), at a
speed drawn from one of three buckets (slow/medium/fast words per minute) and a random pitch,
placed at a random offset in a 1.2 s window, with white noise at a random SNR of 10-30 dB.
Features are log-mel spectrograms (40 bands, 23 ms windows, 11.6 ms hop) from ``torch.stft``.
Tasks: word (10), voice, speed bucket (3). The set is generated once (about a second per 40
utterances per core) and cached under :func:`mtlfast.data.base.cache_dir`.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .base import MTLData, Split, Task, cache_dir

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = (
    "en-us+m1",
    "en-gb+f2",
    "en-gb-scotland+m3",
    "en-029+f4",
    "en-us+m7",
    "en-gb-x-rp+f1",
    "en-us+klatt",
    "en-gb+m5",
)
SPEED_BUCKETS = ((100, 130), (160, 190), (230, 260))  # words per minute
SAMPLE_RATE = 22_050  # espeak-ng's output rate
WINDOW_S = 1.2
N_FFT, HOP, N_MELS = 512, 256, 40
_VERSION = 1  # bump when the generation recipe changes: invalidates the cache


def espeak_binary() -> str:
    """Path of the espeak-ng executable, or an ImportError that says how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ImportError(
            "SpokenDigits needs the espeak-ng speech synthesizer, a system package: "
            "`sudo apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng` (macOS)"
        )
    return exe


def _synthesize(exe: str, word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance as float32 samples in [-1, 1] (espeak-ng's --stdout WAV, header skipped)."""
    wav = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        capture_output=True,
        check=True,
    ).stdout
    # The streamed WAV header is 44 bytes; its length fields are placeholders.
    return np.frombuffer(wav[44:], dtype="<i2").astype(np.float32) / 32768.0


def _trim(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(audio) > threshold)
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE):
    """(n_mels, n_fft // 2 + 1) triangular filters equally spaced on the HTK mel scale."""

    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (freqs - lower) / (center - lower)
    falling = (upper - freqs) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel(audio: torch.Tensor) -> torch.Tensor:
    """(N, samples) audio -> (N, N_MELS, frames) log-mel energies, via ``torch.stft``."""
    spec = torch.stft(
        audio, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, return_complex=True
    )
    power = spec.real**2 + spec.imag**2
    return torch.log(mel_filterbank() @ power + 1e-6)


def _generate(n_voices: int, reps: int, seed: int) -> dict[str, torch.Tensor]:
    exe = espeak_binary()
    rng = np.random.default_rng(seed)
    cells = [
        (w, v, s, r)
        for w in range(len(WORDS))
        for v in range(n_voices)
        for s in range(len(SPEED_BUCKETS))
        for r in range(reps)
    ]
    speeds = [int(rng.integers(*SPEED_BUCKETS[s], endpoint=True)) for _, _, s, _ in cells]
    pitches = rng.integers(25, 75, size=len(cells), endpoint=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        clips = list(
            pool.map(
                lambda i: _trim(_synthesize(exe, WORDS[cells[i][0]], VOICES[cells[i][1]],
                                            speeds[i], int(pitches[i]))),
                range(len(cells)),
            )
        )
    length = int(WINDOW_S * SAMPLE_RATE)
    audio = np.zeros((len(cells), length), dtype=np.float32)
    for i, clip in enumerate(clips):
        clip = clip[:length]
        offset = int(rng.integers(0, length - len(clip), endpoint=True))
        audio[i, offset : offset + len(clip)] = clip
        signal_power = float(np.mean(clip**2)) * len(clip) / length
        snr_db = rng.uniform(10.0, 30.0)
        noise = rng.standard_normal(length).astype(np.float32)
        audio[i] += noise * math.sqrt(signal_power / 10 ** (snr_db / 10))
    labels = torch.tensor(cells, dtype=torch.int64)
    return {
        "features": log_mel(torch.from_numpy(audio)),
        "word": labels[:, 0],
        "voice": labels[:, 1],
        "speed": labels[:, 2],
        "rep": labels[:, 3],
    }


def spoken_digits(n_voices: int = 8, reps: int = 6, seed: int = 0) -> MTLData:
    """Build (or load from cache) SpokenDigits: inputs (N, 1, 40, 104), tasks word/voice/speed.

    ``10 * n_voices * 3 * reps`` utterances. Split by repetition, so every (word, voice,
    speed) cell appears in every split with different draws of speed, pitch, offset and
    noise: the last repetition is the test set, the one before it validation, the rest
    training (``reps >= 3``). Features are standardized per mel band with training statistics.
    """
    if not 1 <= n_voices <= len(VOICES):
        raise ValueError(f"n_voices must be in [1, {len(VOICES)}], got {n_voices!r}")
    if reps < 3:
        raise ValueError(f"reps must be >= 3 (train, val and test repetitions), got {reps!r}")
    path = cache_dir() / f"spoken_digits_v{_VERSION}_{n_voices}x{reps}_s{seed}.pt"
    if path.exists():
        raw = torch.load(path)
    else:
        raw = _generate(n_voices, reps, seed)
        tmp = path.with_suffix(".tmp")
        torch.save(raw, tmp)
        tmp.replace(path)
    x = raw["features"].unsqueeze(1)
    rep = raw["rep"]
    parts = {"train": rep < reps - 2, "val": rep == reps - 2, "test": rep == reps - 1}
    train_x = x[parts["train"]]
    mean = train_x.mean(dim=(0, 3), keepdim=True)
    std = train_x.std(dim=(0, 3), keepdim=True).clamp_min(1e-6)
    splits = {
        name: Split(
            (x[mask] - mean) / std,
            {"word": raw["word"][mask], "voice": raw["voice"][mask], "speed": raw["speed"][mask]},
            source=torch.nonzero(mask).squeeze(1),
        )
        for name, mask in parts.items()
    }
    return MTLData(
        name="speech",
        tasks=[
            Task("word", "classification", len(WORDS)),
            Task("voice", "classification", n_voices),
            Task("speed", "classification", len(SPEED_BUCKETS)),
        ],
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        description=f"SpokenDigits: espeak-ng digit words, {n_voices} voices, 3 speeds, "
        "noisy; word, voice, speed bucket",
    )
