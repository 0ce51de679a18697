"""Issue 14, DeQA for real users: `scripts/deqa_reward_server.py` is a standalone server (stdlib + Pillow, DeQA's own
packages imported lazily) that runs in DeQA-Score's pinned environment and speaks the protocol of apex_nb's `deqa`
reward. Here it runs as a real subprocess with `--stand-in` (no weights, no GPU), on loopback only, and apex_nb's own
client talks to it."""
import ast, base64, http.client, io, json, os, queue, select, socket, struct, subprocess, sys, threading, time, zlib
from pathlib import Path
from urllib.parse import urlsplit
import numpy as np
import pytest
import torch
from PIL import Image
import apex_nb.rewards as rewards
from apex_nb.rewards import get_reward, post_scores
from image_bombs import png_chunk, png_bomb, jpeg_bomb   # decompression bombs built from headers alone

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "deqa_reward_server.py"
# The interpreter that runs the script: this one, or e.g. DeQA-Score's own (Python 3.8 + Pillow) via the environment.
SERVER_PYTHON = os.environ.get("DEQA_SERVER_PYTHON") or sys.executable
STAND_IN = "stand-in: mean brightness"
# Run the script with apex_nb, torch and transformers made unimportable: it must not need them (with --stand-in).
LAUNCH = ("import runpy, sys\n"
          "for m in ('apex_nb', 'torch', 'transformers'): sys.modules[m] = None\n"
          "sys.argv = sys.argv[1:]\n"
          "runpy.run_path(sys.argv[0], run_name='__main__')\n")


class Server:
    "The script as a subprocess; `url` is read from the line it prints once it listens."
    def __init__(self, *args, tmp):
        self.log = open(tmp / f"server-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([SERVER_PYTHON, "-c", LAUNCH, str(SCRIPT), "--stand-in", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(l) for l in self.proc.stdout], daemon=True).start()
        self.banner, deadline = [], time.monotonic() + 10
        while True:
            try: line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty: self.close(); raise RuntimeError(f"server did not start: {self.banner} {self.stderr()}")
            self.banner.append(line)
            if "listening on " in line: break
        self.url = line.split("listening on ", 1)[1].strip()
        u = urlsplit(self.url)
        self.host, self.port = u.hostname, u.port

    def stderr(self): self.log.seek(0); return self.log.read()
    def rss_kb(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"): return int(line.split()[1])
    def close(self):
        self.proc.terminate()
        try: self.proc.wait(5)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("--workers", "2", "--timeout", "1", "--max-request-bytes", str(1 << 20), "--batch-size", "3",
               tmp=tmp_path_factory.mktemp("deqa"))
    yield s
    s.close()


def post_raw(srv, body: bytes, path="/score", method="POST", timeout=5):
    "(status, JSON payload) of one raw request."
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally: c.close()


def request_of(*blobs: bytes) -> bytes:
    return json.dumps({"images": [base64.b64encode(b).decode() for b in blobs], "prompts": [""] * len(blobs)}).encode()


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO(); im.save(buf, format=fmt, **kw); return buf.getvalue()


def stand_in(im: Image.Image) -> float:
    "The stand-in's formula, computed here: 1 + 4 × mean of the R, G, B values / 255."
    return 1 + 4 * np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255




# ---------------------------------------------------------------------------------------------- the script itself
def test_script_is_standalone_stdlib_and_py38():
    src = SCRIPT.read_text()
    tree = ast.parse(src, feature_version=(3, 8))          # no syntax newer than Python 3.8
    def top_modules(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
            if isinstance(node, ast.Import): yield from (a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom): yield (node.module or "").split(".")[0] if not node.level else "."
            else: yield from top_modules(ast.iter_child_nodes(node))     # imports nested in if / try at module level
    module_level = set(top_modules(tree.body))
    assert module_level and module_level <= set(sys.stdlib_module_names) | {"__future__"}, module_level - set(sys.stdlib_module_names)
    everywhere = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    everywhere |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "apex_nb" not in everywhere
    dynamic = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None))
               in ("__import__", "import_module", "run_module", "run_path")]
    assert not dynamic, "the script must not import modules dynamically"
    assert everywhere - set(sys.stdlib_module_names) == {"PIL", "torch", "transformers"}   # imported lazily, in functions


def test_starts_on_loopback_and_says_it_is_a_stand_in(server):
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/score")
    assert any("STAND-IN" in l and STAND_IN in l for l in server.banner), server.banner
    assert post_raw(server, b"", path="/health", method="GET") == (200, {"status": "ok", "scorer": STAND_IN})


# ---------------------------------------------------------------------------------------------- scores, end to end
def test_apex_nb_deqa_reward_gets_the_stand_in_scores_in_order(server):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(lo, lo + 60, (h, w, 3), dtype=np.uint8))
              for lo, (h, w) in zip([190, 10, 120, 60, 150, 30, 90], [(16, 24), (32, 8), (8, 8), (40, 20), (12, 12), (9, 31), (20, 20)])]
    expected = [stand_in(im) for im in images]
    assert len(set(np.round(expected, 3))) == len(images)                 # all different: order is checked
    # the registered reward, batching 4 per request; the server scores 3 at a time on the "model"
    deqa = get_reward("deqa", url=server.url, batch_size=4)
    with pytest.warns(UserWarning, match="serves 'stand-in: mean brightness', not DeQA-Score"):   # a stand-in never passes unnoticed
        got = deqa(images, [f"p{i}" for i in range(len(images))])
    assert got.dtype == torch.float32 and got.shape == (len(images),)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)                  # float32 of the same numbers
    assert post_scores(server.url, images, [""] * len(images)) == pytest.approx(expected, rel=1e-12)
    # JPEG is accepted too; the response carries the scorer's name
    status, payload = post_raw(server, request_of(encoded(images[0], "JPEG", quality=95), encoded(images[1], "PNG")))
    assert status == 200 and payload["scorer"] == STAND_IN and len(payload["scores"]) == 2
    assert payload["scores"][1] == pytest.approx(expected[1], rel=1e-12) and 1 <= payload["scores"][0] <= 5


# ---------------------------------------------------------------------------------------------- refusals
def test_too_large_request_is_413_and_the_client_sees_it(server):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8))  # ~1.5 MB PNG
    with pytest.raises(RuntimeError, match=r"HTTP 413: .*above the limit of 1048576 bytes \(--max-request-bytes\)"):
        post_scores(server.url, [noise], [""])


@pytest.mark.parametrize("fmt, name", [("GIF", "GIF"), ("BMP", "BMP"), ("EPS", "EPS"), ("WEBP", "WEBP"), ("TIFF", "TIFF")])
def test_only_png_and_jpeg(server, fmt, name):
    blob = encoded(Image.new("RGB", (8, 8), (1, 2, 3)), fmt)
    status, payload = post_raw(server, request_of(encoded(Image.new("RGB", (8, 8)), "PNG"), blob))
    assert status == 400, payload
    assert payload["error"].startswith(f"image 1 is {name}") and "only PNG and JPEG are accepted" in payload["error"]


def test_apex_nb_client_surfaces_the_servers_message(server, monkeypatch):
    gif = base64.b64encode(encoded(Image.new("RGB", (8, 8)), "GIF")).decode()
    monkeypatch.setattr(rewards, "encode_images", lambda images: [gif] * len(images))
    with pytest.raises(RuntimeError, match=r"answered HTTP 400: .*image 0 is GIF; only PNG and JPEG are accepted"):
        get_reward("deqa", url=server.url)([Image.new("RGB", (8, 8))])


@pytest.mark.parametrize("bomb, declared", [(png_bomb(), "100000×100000"), (jpeg_bomb(), "65000×65000")])
def test_decompression_bomb_refused_from_its_header(server, bomb, declared):
    rss0, t0 = server.rss_kb(), time.monotonic()
    status, payload = post_raw(server, request_of(bomb))
    elapsed, rss1 = time.monotonic() - t0, server.rss_kb()
    assert status == 413 and f"declares {declared}" in payload["error"] and "refused before decoding" in payload["error"]
    assert elapsed < 2 and rss1 - rss0 < 20_000, (elapsed, rss0, rss1)         # nothing near 30 GB was allocated


NOISE_PNG = encoded(Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)), "PNG")


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"),
    (b'{"imgs": []}', 400, 'expected a JSON object {"images"'),
    (b'{"images": [3]}', 400, "image 0 is a JSON int"),
    (b'{"images": ["@@@"]}', 400, "image 0 is not valid base64"),
    (json.dumps({"images": [base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 30).decode()]}).encode(), 400, "bad PNG header"),
    (json.dumps({"images": [base64.b64encode(NOISE_PNG[:len(NOISE_PNG) // 2]).decode()]}).encode(), 400, "cannot decode"),
    (json.dumps({"images": [], "prompts": ["a"]}).encode(), 400, '"prompts" must be a list with one entry per image'),
    (json.dumps({"images": ["x"] * 300}).encode(), 413, "300 images in one request"),
])
def test_bad_requests(server, body, status, message):
    got, payload = post_raw(server, body)
    assert (got, payload["scorer"]) == (status, STAND_IN) and message in payload["error"], payload


def test_unknown_path_and_method_answer_json(server):
    with pytest.raises(RuntimeError, match="HTTP 404"):
        post_scores(server.url.replace("/score", "/nope"), [Image.new("RGB", (8, 8))], [""])
    status, payload = post_raw(server, b"", method="PUT")
    assert status == 501 and payload["scorer"] == STAND_IN and "PUT" in payload["error"]


# ---------------------------------------------------------------------------------------------- slow and idle clients
def idle_client(srv) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=5)
    return s


def dropped_after(s: socket.socket, t0: float) -> float:
    "Seconds from t0 until the server closes `s` (it sends nothing, or a 408, first)."
    try: data = s.recv(4096)
    except ConnectionResetError: data = b""
    assert data == b"" or data.startswith(b"HTTP/1.0 408"), data
    return time.monotonic() - t0


def test_idle_client_is_dropped_while_others_are_served(server):
    t0 = time.monotonic()
    idle = idle_client(server)
    time.sleep(0.1)
    im = Image.new("RGB", (8, 8), (51, 51, 51))
    assert post_scores(server.url, [im], [""], timeout=5) == pytest.approx([1.8])
    assert time.monotonic() - t0 < 0.8                                        # served while the idle one holds a worker
    assert 0.8 < dropped_after(idle, t0) < 3                                  # --timeout 1
    idle.close()


def test_workers_are_bounded_extra_connections_wait(server):
    t0 = time.monotonic()
    idles = [idle_client(server) for _ in range(2)]                          # both workers (--workers 2) taken
    time.sleep(0.2)
    assert post_scores(server.url, [Image.new("RGB", (4, 4), (255, 255, 255))], [""], timeout=5) == [5.0]
    assert time.monotonic() - t0 > 0.8                                        # it waited for an idle one to be dropped
    for s in idles: dropped_after(s, t0); s.close()


def test_busy_server_answers_503_after_queue_timeout(tmp_path):
    srv = Server("--workers", "1", "--timeout", "3", "--queue-timeout", "0.3", tmp=tmp_path)
    try:
        idle = idle_client(srv)
        time.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"HTTP 503: .*server busy: all 1 workers"):
            post_scores(srv.url, [Image.new("RGB", (4, 4))], [""], timeout=5)
        assert time.monotonic() - t0 < 2
        idle.close()
    finally:
        srv.close()


def test_slow_drip_client_is_cut_off_at_the_request_deadline(tmp_path):
    srv = Server("--timeout", "5", "--request-deadline", "1", tmp=tmp_path)
    try:
        t0, cut = time.monotonic(), None
        s = idle_client(srv)
        s.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n")
        while cut is None and time.monotonic() - t0 < 4:                     # one byte every 0.2 s: never idle for 5 s
            try:
                s.sendall(b"x")
                if select.select([s], [], [], 0.2)[0]: s.recv(4096); cut = time.monotonic() - t0
            except (BrokenPipeError, ConnectionResetError): cut = time.monotonic() - t0
        assert cut is not None and 0.9 < cut < 2.5, cut                      # --request-deadline 1
        s.close()
    finally:
        srv.close()
