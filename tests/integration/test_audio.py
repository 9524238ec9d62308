"""Speech to text through Nebula: the real `openai` SDK -> gateway -> vLLM CPU serving a tiny random Whisper
(`speech` in api_fixtures.py, loaded without --task: its files say it is a transcribe model).

The weights are random, so the text is nonsense; what is checked is that the engine decoded the upload (the
verbose answer's duration is the clip's), the path both ways, and the errors. Decoding needs the engine
runtime's audio extra (soundfile, PyAV): packaging/engine/vllm-*.in install vllm[audio].
"""

from __future__ import annotations

import io
import json
import math
import struct
import urllib.request
import wave

import openai
import pytest
import requests

from tests.integration.api_fixtures import CHAT_MODEL, SPEECH_MODEL, ApiCluster

pytestmark = [pytest.mark.engine, pytest.mark.etcd]

# A random model rarely stops by itself: every request bounds its output.
SHORT = {"max_completion_tokens": 8}


def sine_wav(rate: int = 16000, channels: int = 1, seconds: float = 1.0) -> bytes:
    """A 440 Hz tone as 16-bit PCM WAV (on the first channel; others silent)."""
    frames = int(rate * seconds)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
                               + b"\0\0" * (channels - 1) for i in range(frames)))
    return out.getvalue()


@pytest.fixture(scope="module")
def client(api_cluster: ApiCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_cluster.base_url, api_key="unused", max_retries=0, timeout=120)


def test_a_whisper_is_loaded_as_a_transcribe_model_from_its_files(api_cluster: ApiCluster) -> None:
    with urllib.request.urlopen(f"{api_cluster.gateway_url}/v1/admin/models/{SPEECH_MODEL}", timeout=10) as resp:
        entry = json.loads(resp.read())
    assert entry["spec"]["task"] == "transcribe"


def test_the_sdk_transcribes_a_wav(client: openai.OpenAI) -> None:
    verbose = client.audio.transcriptions.create(model=SPEECH_MODEL, file=("tone.wav", sine_wav(), "audio/wav"),
                                                 language="en", response_format="verbose_json", extra_body=SHORT)
    assert verbose.duration == pytest.approx(1.0)  # the engine decoded the upload
    assert verbose.language == "en" and isinstance(verbose.text, str)
    plain = client.audio.transcriptions.create(model=SPEECH_MODEL, file=("tone.wav", sine_wav(), "audio/wav"),
                                               language="en", extra_body=SHORT)
    assert isinstance(plain.text, str)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations deprecated
def test_the_sdk_translates_a_clip_the_engine_resamples(client: openai.OpenAI) -> None:
    clip = sine_wav(rate=44100, channels=2)
    verbose = client.audio.translations.create(model=SPEECH_MODEL, file=("tone.wav", clip, "audio/wav"),
                                               response_format="verbose_json", extra_body=SHORT)
    assert verbose.duration == pytest.approx(1.0)


def test_a_streamed_transcription_is_relayed_as_the_engine_sent_it(api_cluster: ApiCluster) -> None:
    files = {"file": ("tone.wav", sine_wav(), "audio/wav")}
    data = {"model": SPEECH_MODEL, "language": "en", "stream": "true", **{k: str(v) for k, v in SHORT.items()}}
    with requests.post(f"{api_cluster.base_url}/audio/transcriptions", files=files, data=data, stream=True,
                       timeout=120) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        body = resp.raw.read()
    assert body.rstrip().endswith(b"data: [DONE]")


def test_errors_come_back_in_openai_s_shape(client: openai.OpenAI) -> None:
    tone = ("tone.wav", sine_wav(), "audio/wav")
    with pytest.raises(openai.NotFoundError) as not_found:
        client.audio.transcriptions.create(model="no-such-model", file=tone)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as wrong_task:
        client.audio.transcriptions.create(model=CHAT_MODEL, file=tone)
    assert wrong_task.value.code == "model_not_supported"
    # Not audio: the engine's own 400, relayed unchanged.
    with pytest.raises(openai.BadRequestError, match="audio"):
        client.audio.transcriptions.create(model=SPEECH_MODEL, file=("notes.txt", b"not audio at all", "text/plain"))
