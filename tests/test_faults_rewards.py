"""Issue 16, the rewards side of "a run directory you can trust": every reward call has a deadline (tesseract, the DeQA
client), the in-process `RewardServer` is bounded (request bytes, pixels, formats, idle clients, workers), a prompt file
that is not UTF-8 is named, and reward options are checked when the reward is built, before any model loads.
No model is loaded here; servers run on 127.0.0.1 in this process."""
import base64, http.client, io, json, socket, struct, threading, time, zlib
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
import torch
from PIL import Image
import apex_nb.rewards as rewards
from apex_nb.rewards import RewardError, RewardServer, get_reward, load_prompts, post_scores, score_batch
import apex_nb.sd3
from apex_nb.config import GRPOConfig      # imported once here (slow: diffusers, accelerate)
from apex_nb.grpo import GRPOTrainer
from apex_nb.trainer import TrainerCore
from image_bombs import png_chunk, png_bomb, jpeg_bomb   # decompression bombs built from headers alone


# ---------------------------------------------------------------------------------------------- 1. tesseract deadline
def fake_tesseract(folder: Path, ocr_body: str) -> str:
    "A stand-in tesseract: answers `--list-langs` at once (check_tesseract), runs `ocr_body` when asked to OCR."
    path = folder / "tesseract"
    path.write_text('#!/bin/sh\nif [ "$1" = "--list-langs" ]; then echo "List of available languages (1):"; echo eng; exit 0; fi\n'
                    + ocr_body)
    path.chmod(0o755)
    return str(path)


SIGN = Image.new("RGB", (64, 32), "white")


def test_tesseract_that_hangs_is_killed_at_the_ocr_deadline(tmp_path):
    hangs = fake_tesseract(tmp_path, "exec sleep 30\n")                  # exec: the killed process is the sleeper itself
    ocr = get_reward("ocr", tesseract_cmd=hangs, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(RewardError) as e: score_batch({"ocr": ocr}, [SIGN], ['"HI"'])
    assert time.monotonic() - t0 < 3
    msg = str(e.value)
    assert msg.startswith("reward 'ocr' failed: TimeoutError: ") and "0.5 s" in msg and "timeout=" in msg, msg


def test_the_ocr_deadline_reaches_the_trainer_as_a_named_stop_at_its_step(tmp_path):
    "The GRPO/DPO scoring path (TrainerCore.score) stops the run naming the reward, the deadline and the step."
    ocr = get_reward("ocr", tesseract_cmd=fake_tesseract(tmp_path, "exec sleep 30\n"), timeout=0.3)
    core = SimpleNamespace(rewards={"ocr": ocr}, names=["ocr"])
    with pytest.raises(RuntimeError) as e: TrainerCore.score(core, torch.ones(1, 3, 16, 16), ['"HI"'], step=7)
    msg = str(e.value)
    assert "scoring failed at step 7" in msg and "reward 'ocr' failed: TimeoutError" in msg and "0.3 s" in msg, msg


def test_a_working_tesseract_within_its_deadline_still_scores(tmp_path):
    reads_hi = fake_tesseract(tmp_path, "cat > /dev/null; echo HI\n")
    assert get_reward("ocr", tesseract_cmd=reads_hi, timeout=5)([SIGN, SIGN], ['"HI"', '"HO"']).tolist() == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------- 2. DeQA client deadline
def dripping_server(seconds: float, step: float = 0.1):
    "A raw HTTP server that answers a valid score, one byte every `step` s over about `seconds` s. Returns (url, stop)."
    lsock = socket.create_server(("127.0.0.1", 0))
    body = json.dumps({"scores": [3.0]}).encode()
    body += b" " * max(0, int(seconds / step) - len(body))             # JSON allows trailing spaces: make it drip long enough
    stop = threading.Event()
    def serve():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try: conn, _ = lsock.accept()
            except OSError: continue
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data: data += conn.recv(65536)
                    head, rest = data.split(b"\r\n\r\n", 1)
                    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
                    while len(rest) < length: rest += conn.recv(65536)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
                    for i in range(len(body)):
                        if stop.is_set(): break
                        conn.sendall(body[i:i + 1]); time.sleep(step)
                except OSError: pass
    threading.Thread(target=serve, daemon=True).start()
    def close(): stop.set(); lsock.close()
    return f"http://127.0.0.1:{lsock.getsockname()[1]}/score", close


def test_deqa_timeout_is_a_deadline_for_the_whole_request():
    url, close = dripping_server(seconds=2.5)                           # every read well under the 0.8 s timeout
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"gave no answer within 0.8 s"):
            post_scores(url, [SIGN], [""], timeout=0.8)
        assert time.monotonic() - t0 < 1.6
        with pytest.raises(RewardError, match=r"reward 'deqa' failed: TimeoutError: .*within 0.8 s"):
            score_batch({"deqa": get_reward("deqa", url=url, timeout=0.8)}, [SIGN], [""])
    finally: close()


@pytest.mark.parametrize("timeout", [None, 0, -1.0, float("inf"), "60", True])
def test_deqa_timeout_must_be_positive_seconds(timeout):
    with pytest.raises(ValueError, match=r"timeout .*must be a number of seconds > 0.*got " + repr(timeout).replace("(", r"\(")):
        post_scores("http://127.0.0.1:9/score", [SIGN], [""], timeout=timeout)
    with pytest.raises(ValueError, match=r"option timeout of reward 'deqa' must be a number of seconds > 0"):
        get_reward("deqa", url="http://127.0.0.1:9/score", timeout=timeout)


# ---------------------------------------------------------------------------------------------- 3. RewardServer bounds
def brightness(images, prompts): return [1 + 4 * np.asarray(im, dtype=np.float64).mean() / 255 for im in images]


def encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO(); im.save(buf, format=fmt); return buf.getvalue()


def request_of(*blobs: bytes) -> bytes:
    return json.dumps({"images": [base64.b64encode(b).decode() for b in blobs], "prompts": [""] * len(blobs)}).encode()


def post_raw(srv: RewardServer, body: bytes, timeout=5):
    "(status, JSON payload) of one raw POST /score."
    host, port = srv.httpd.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally: c.close()




def test_server_refuses_a_request_above_max_request_bytes_with_413():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))   # ~270 kB PNG
    with RewardServer(brightness, max_request_bytes=100_000) as srv:
        with pytest.raises(RuntimeError, match=r"HTTP 413: .*request body of \d+ bytes is above the limit of 100000 bytes"):
            post_scores(srv.url, [noise], [""], timeout=5)
        assert post_scores(srv.url, [Image.new("RGB", (8, 8), (51, 51, 51))], [""], timeout=5) == pytest.approx([1.8])


@pytest.mark.parametrize("bomb, declared", [(png_bomb(), "100000×100000"), (jpeg_bomb(), "65000×65000")])
def test_server_refuses_a_pixel_bomb_from_its_header(bomb, declared):
    with RewardServer(brightness) as srv:
        t0 = time.monotonic()
        status, payload = post_raw(srv, request_of(bomb))
        assert time.monotonic() - t0 < 2
    assert status == 413 and f"declares {declared}" in payload["error"] and "refused before decoding" in payload["error"], payload


def test_server_max_pixels_per_image_and_per_request():
    small, big = encoded(Image.new("RGB", (8, 8)), "PNG"), encoded(Image.new("RGB", (100, 100)), "PNG")
    with RewardServer(brightness, max_pixels=64 * 64, max_request_pixels=100) as srv:
        status, payload = post_raw(srv, request_of(small, big))
        assert status == 413 and "image 1: PNG header declares 100×100 = 10000 pixels, above the limit of 4096" in payload["error"], payload
        status, payload = post_raw(srv, request_of(small, small))
        assert status == 413 and "128 pixels in one request, above the limit of 100" in payload["error"], payload
        assert post_raw(srv, request_of(small))[0] == 200


@pytest.mark.parametrize("fmt, name", [("GIF", "GIF"), ("BMP", "BMP"), ("EPS", "EPS"), ("TIFF", "TIFF"), ("WEBP", "WEBP")])
def test_server_decodes_only_png_and_jpeg(fmt, name):
    blob = encoded(Image.new("RGB", (8, 8), (1, 2, 3)), fmt)
    with RewardServer(brightness) as srv:
        status, payload = post_raw(srv, request_of(encoded(Image.new("RGB", (8, 8)), "JPEG"), blob))
    assert status == 400 and payload["error"].startswith(f"image 1 is {name}"), payload
    assert "only PNG and JPEG are accepted" in payload["error"]


def test_server_answers_bad_requests_with_400_not_500():
    with RewardServer(brightness) as srv:
        status, payload = post_raw(srv, b"{not json")
        assert status == 400 and "not JSON" in payload["error"], payload
        status, payload = post_raw(srv, b'{"images": ["@@@"]}')
        assert status == 400 and "image 0 is not valid base64" in payload["error"], payload
        status, payload = post_raw(srv, b'{"images": [], "prompts": ["a"]}')
        assert status == 400 and '"prompts" must be a list with one entry per image' in payload["error"], payload


def idle_client(srv: RewardServer) -> socket.socket:
    return socket.create_connection(srv.httpd.server_address[:2], timeout=5)


def test_server_drops_an_idle_client_and_serves_others_meanwhile():
    with RewardServer(brightness, idle_timeout=0.5, workers=2) as srv:
        t0 = time.monotonic()
        idle = idle_client(srv)
        assert post_scores(srv.url, [Image.new("RGB", (4, 4), (255, 255, 255))], [""], timeout=5) == [5.0]
        assert time.monotonic() - t0 < 0.4                                   # not stuck behind the idle one
        try: data = idle.recv(4096)
        except ConnectionResetError: data = b""
        assert data == b"" or data.startswith(b"HTTP/1.0 408"), data
        assert 0.4 < time.monotonic() - t0 < 2.5                             # dropped after idle_timeout
        idle.close()


def test_server_workers_are_bounded_and_a_long_queue_gets_503():
    with RewardServer(brightness, workers=1, idle_timeout=3, queue_timeout=0.3) as srv:
        idle = idle_client(srv)                                              # holds the only worker
        time.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"HTTP 503: .*server busy: all 1 workers stayed busy for 0.3 s"):
            post_scores(srv.url, [Image.new("RGB", (4, 4))], [""], timeout=5)
        assert time.monotonic() - t0 < 2
        idle.close()
        assert post_scores(srv.url, [Image.new("RGB", (4, 4), (255, 255, 255))], [""], timeout=5) == [5.0]   # worker free again


def test_server_threads_stay_bounded_under_many_stalled_connections():
    before = threading.active_count()
    with RewardServer(brightness, workers=2, idle_timeout=2, queue_timeout=5) as srv:
        stalled = [idle_client(srv) for _ in range(12)]
        time.sleep(0.4)
        assert threading.active_count() - before <= 1 + 2 * 2 + 4           # serve loop, workers (+ their watchdogs), 503 senders
        for s in stalled: s.close()


@pytest.mark.parametrize("option, value", [("max_request_bytes", 0), ("max_pixels", -1), ("workers", 0),
                                           ("idle_timeout", None), ("queue_timeout", 0), ("max_images", 2.5)])
def test_server_limits_are_checked(option, value):
    with pytest.raises(ValueError, match=f"RewardServer {option} must be"):
        RewardServer(brightness, **{option: value})


# ---------------------------------------------------------------------------------------------- 4. prompt files
def test_a_prompt_file_that_is_not_utf8_is_named_with_line_and_byte(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes('a cat\nun café\n'.encode("latin-1"))
    with pytest.raises(ValueError) as e: load_prompts(p)
    msg = str(e.value)
    assert f"{p}:2:" in msg and "not UTF-8" in msg and "byte 12" in msg and "0xe9" in msg, msg
    p.write_bytes('a cat\nun café\n'.encode("utf-8"))
    assert load_prompts(p) == ["a cat", "un café"]


def test_bad_jsonl_lines_still_name_the_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r'p.jsonl:2: expected a JSON object with a "prompt" field'): load_prompts(p)


# ---------------------------------------------------------------------------------------------- 5. reward options
@pytest.fixture
def no_model_loads(monkeypatch):
    "Any reward load fails the test: options must be checked when the reward is built."
    def boom(self): raise AssertionError("a reward was loaded before its options were checked")
    monkeypatch.setattr(rewards.Reward, "load", boom)


@pytest.mark.parametrize("name, options, message", [
    ("ocr", dict(psm=99), "option psm of reward 'ocr' must be a tesseract page segmentation mode 1 or 3..13, got 99"),
    ("ocr", dict(psm=0), "0 (orientation and script detection only) reads no text"),
    ("ocr", dict(psm="7"), "got '7'"),
    ("ocr", dict(timeout=0), "option timeout of reward 'ocr' must be a number of seconds > 0"),
    ("ocr", dict(timeout=-5), "got -5"),
    ("ocr", dict(workers=0), "option workers of reward 'ocr' must be an integer >= 1, got 0"),
    ("ocr", dict(threads=1.5), "option threads of reward 'ocr' must be an integer >= 1, got 1.5"),
    ("ocr", dict(min_side=True), "option min_side of reward 'ocr' must be an integer >= 1, got True"),
    ("ocr", dict(lang=""), "option lang of reward 'ocr' must be"),
    ("jpeg_incompressibility", dict(quality=101), "option quality of reward 'jpeg_incompressibility' must be an integer in 0..100, got 101"),
    ("jpeg_compressibility", dict(scale=0), "option scale of reward 'jpeg_compressibility' must be a finite number > 0, got 0"),
    ("brisque", dict(undefined_score=float("nan")), "option undefined_score of reward 'brisque' must be a finite number, got nan"),
    ("clipscore", dict(batch_size=0), "option batch_size of reward 'clipscore' must be an integer >= 1, got 0"),
    ("clipscore", dict(dtype="float8"), "option dtype of reward 'clipscore' must be one of float32, float16, bfloat16 (or a torch.dtype), got 'float8'"),
    ("clipscore", dict(device="gpu0"), "option device of reward 'clipscore' must be a torch device"),
    ("clipscore", dict(local_files_only="yes"), "option local_files_only of reward 'clipscore' must be True or False, got 'yes'"),
    ("pickscore", dict(divisor=-26), "option divisor of reward 'pickscore' must be a finite number > 0, got -26"),
    ("deqa", dict(url="127.0.0.1:18086/score"), "option url of reward 'deqa' must be an http:// or https:// URL"),
    ("deqa", dict(batch_size=0), "option batch_size of reward 'deqa' must be an integer >= 1, got 0"),
])
def test_reward_options_are_checked_when_built(no_model_loads, name, options, message):
    with pytest.raises(ValueError) as e: get_reward(name, **options)
    assert message in str(e.value), str(e.value)


def test_good_reward_options_pass_and_grpo_refuses_bad_ones_before_loading(no_model_loads, tmp_path, monkeypatch):
    get_reward("ocr", psm=7, timeout=30, workers=2)
    get_reward("clipscore", device="cuda:1", dtype="bfloat16", batch_size=8)
    get_reward("deqa", url="http://127.0.0.1:18086/score", timeout=300.0)
    def boom(*a, **k): raise AssertionError("a model was loaded before the configuration was validated")
    for f in ("load_pipeline", "tiny_sd3_pipeline"): monkeypatch.setattr(apex_nb.sd3, f, boom)
    with pytest.raises(ValueError, match="option psm of reward 'ocr' must be a tesseract page segmentation mode"):
        GRPOTrainer(GRPOConfig(steps=2, group_size=2, groups_per_step=2, sample_steps=2, out_dir=str(tmp_path / "run"),
                               objectives="ocr", prompts=['a sign that says "HI"'], reward_options={"ocr": {"psm": 99}}))
    assert not (tmp_path / "run").exists()
