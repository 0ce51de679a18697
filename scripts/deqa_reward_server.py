#!/usr/bin/env python
"""A DeQA-Score reward server for apex_nb's `deqa` reward, meant to run inside DeQA-Score's own environment.

DeQA-Score pins an old stack (torch 2.0.1, transformers 4.36.1: see its pyproject.toml), which apex_nb cannot share,
so the model is served over HTTP from its own environment and apex_nb's `deqa` reward (`apex_nb.rewards.post_scores`)
is the client. This file is standalone on purpose: Python 3.8+ standard library at module level, Pillow to decode
images, and DeQA's own packages (torch, transformers) imported only inside `load_deqa_scorer`. It never imports
apex_nb. Copy it anywhere.

The protocol (the same as `apex_nb.rewards.RewardServer`):

    POST /score   {"images": [base64 PNG or JPEG, ...], "prompts": [str, ...]}     ("prompts" optional, ignored)
      200 {"scores": [float, ...], "scorer": "..."}          one score per image, in order (DeQA: 1 bad ... 5 excellent)
      4xx/5xx {"error": "what went wrong", "scorer": "..."}
          400 malformed JSON / fields / base64, an image that is not PNG or JPEG, an undecodable image
          404 any other path          411 no Content-Length          408 the request did not arrive in time
          413 request body above --max-request-bytes, an image above --max-pixels, more than --max-images images
          500 the model failed (the message names the exception)
          503 every worker stayed busy for --queue-timeout seconds (retry later)
    GET /health   200 {"status": "ok", "scorer": "..."}

Limits: bound to 127.0.0.1 unless --host says otherwise; a request body is read only when its declared length is within
--max-request-bytes; each image's width × height is read from its PNG/JPEG header and refused above --max-pixels before
anything is decoded (decompression bombs); --workers connections are handled at once (more wait up to
--queue-timeout, then get 503); a client idle for --timeout seconds is dropped, and one that takes more than
--request-deadline seconds to send its request is cut off; the model scores one batch of --batch-size images at a
time (a lock), whatever the number of clients.

    python deqa_reward_server.py --port 18086                 # DeQA-Score-Mix3 on the GPU(s), device_map="auto"
    python deqa_reward_server.py --port 18086 --stand-in      # no weights: a stand-in scorer to test the protocol

`--stand-in` scores 1 + 4 × mean brightness (mean of the R, G, B values / 255), a number in DeQA's 1–5 range that a
test can compute; the server says so on start-up and in the "scorer" field of every response.
"""
import argparse
import base64
import binascii
import io
import ipaddress
import json
import math
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_MODEL = "zhiyuanyou/DeQA-Score-Mix3"
STAND_IN = "stand-in: mean brightness"
ALLOWED = ("PNG", "JPEG")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the frame size); C4 (DHT), C8 (JPG), CC (DAC) are not frames.
JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Leading bytes of formats we refuse, so that the error can name them.
OTHER_MAGIC = [
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"qoif", "QOI"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "HDR"), (b"<?xml", "XML/SVG"), (b"<svg", "SVG"),
]


class RequestError(Exception):
    "A request we refuse: `code` is the HTTP status, the message goes back to the client."
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


# ------------------------------------------------------------------------------------------------ image checks
def sniff_format(data):
    "'PNG', 'JPEG', the name of another recognised format, or None."
    if data.startswith(PNG_MAGIC): return "PNG"
    if data.startswith(b"\xff\xd8\xff"): return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP": return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"): return "AVIF/HEIF"
    for magic, name in OTHER_MAGIC:
        if data.startswith(magic): return name
    return None


def png_size(data):
    "(width, height) from the IHDR chunk, which the PNG spec requires to come first."
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ValueError("PNG without an IHDR header chunk")
    return struct.unpack(">II", data[16:24])


def jpeg_size(data):
    "(width, height) from the first start-of-frame segment, walking the JPEG markers (no pixel data is touched)."
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF: raise ValueError("JPEG marker expected at byte %d" % i)
        marker = data[i + 1]
        if marker == 0xFF: i += 1; continue                                  # fill byte
        if marker == 0x01 or 0xD0 <= marker <= 0xD8: i += 2; continue          # markers without a length
        if marker in (0xD9, 0xDA): raise ValueError("JPEG without a frame header before its scan data")
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        if seg_len < 2: raise ValueError("JPEG segment with a bad length at byte %d" % i)
        if marker in JPEG_SOF:
            if i + 9 > n: break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + seg_len
    raise ValueError("JPEG header is truncated (no frame header found)")


def check_image(index, data, max_pixels):
    "Check one encoded image from its header only; returns its format. Raises RequestError (400 / 413)."
    fmt = sniff_format(data)
    if fmt not in ALLOWED:
        what = fmt if fmt else "an unrecognised format (first bytes %r)" % data[:8]
        raise RequestError(400, "image %d is %s; only %s are accepted" % (index, what, " and ".join(ALLOWED)))
    try:
        width, height = png_size(data) if fmt == "PNG" else jpeg_size(data)
    except (ValueError, struct.error) as e:
        raise RequestError(400, "image %d: bad %s header: %s" % (index, fmt, e))
    if width <= 0 or height <= 0:
        raise RequestError(400, "image %d: %s header declares an empty image (%d×%d)" % (index, fmt, width, height))
    if width * height > max_pixels:
        raise RequestError(413, "image %d: %s header declares %d×%d = %d pixels, above the limit of %d (--max-pixels); "
                                "refused before decoding" % (index, fmt, width, height, width * height, max_pixels))
    return fmt


def decode_image(index, data, max_pixels):
    "RGB PIL image from PNG/JPEG bytes already checked by `check_image`. Raises RequestError (400 / 413)."
    from PIL import Image                                   # Pillow: present in DeQA-Score's environment
    Image.MAX_IMAGE_PIXELS = max_pixels                     # Pillow's own bomb check as a second line of defence
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in ALLOWED:
                raise RequestError(400, "image %d is %s; only %s are accepted" % (index, im.format, " and ".join(ALLOWED)))
            if im.size[0] * im.size[1] > max_pixels:
                raise RequestError(413, "image %d: %d×%d pixels, above the limit of %d (--max-pixels)" % ((index,) + im.size + (max_pixels,)))
            return im.convert("RGB")
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(413, "image %d refused by Pillow: %s" % (index, e))
    except getattr(Image, "UnidentifiedImageError", ()) as e:
        raise RequestError(400, "image %d: Pillow cannot read it as %s (corrupt data)" % (index, " or ".join(ALLOWED)))
    except Exception as e:  # truncated / corrupt data: Pillow raises OSError, SyntaxError, ValueError, ...
        raise RequestError(400, "image %d: cannot decode it: %s: %s" % (index, type(e).__name__, e))


def parse_request(body, opts):
    "The encoded images (bytes, header-checked) of a request body. Raises RequestError."
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, "the request body is not JSON: %s" % e)
    if not isinstance(req, dict) or not isinstance(req.get("images"), list):
        raise RequestError(400, 'expected a JSON object {"images": [base64 PNG or JPEG, ...], "prompts": [str, ...]}')
    images, prompts = req["images"], req.get("prompts")
    if len(images) > opts.max_images:
        raise RequestError(413, "%d images in one request, above the limit of %d (--max-images)" % (len(images), opts.max_images))
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) != len(images)):
        raise RequestError(400, '"prompts" must be a list with one entry per image (%d images)' % len(images))
    out = []
    for i, s in enumerate(images):
        if not isinstance(s, str):
            raise RequestError(400, "image %d is a JSON %s, expected a base64 string" % (i, type(s).__name__))
        if s.startswith("data:") and "," in s[:100]: s = s.split(",", 1)[1]    # tolerate a data: URL
        try:
            data = base64.b64decode("".join(s.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, "image %d is not valid base64: %s" % (i, e))
        check_image(i, data, opts.max_pixels)
        out.append(data)
    return out


# ------------------------------------------------------------------------------------------------ scorers
def stand_in_scorer(images, prompts):
    "Stand-in, NOT DeQA-Score: 1 + 4 × mean of the R, G, B values / 255 (the stand-in of nbs/05_rewards.ipynb)."
    from PIL import ImageStat
    return [1.0 + 4.0 * (sum(ImageStat.Stat(im).mean) / 3.0) / 255.0 for im in images]


def load_deqa_scorer(model, device, dtype):
    """`fn(images, prompts) -> list of floats` from DeQA-Score, loaded as its README shows.

    DeQA-Score's README (github.com/zhiyuanyou/DeQA-Score, commit 8e4abc8, "run directly with transformers==4.36.1"):
        model = AutoModelForCausalLM.from_pretrained("zhiyuanyou/DeQA-Score-Mix3", trust_remote_code=True,
                    attn_implementation="eager", torch_dtype=torch.float16, device_map="auto")
        model.score([PIL images])          # "The inputs should be a list of multiple PIL images"
    `score` is the model's remote code: the softmax over the logits of "excellent, good, fair, poor, bad" after the
    prompt "How would you rate the quality of this image?", weighted by 5, 4, 3, 2, 1 (src/evaluate/scorer.py there
    does the same), i.e. a tensor of N scores in [1, 5]; Flow-GRPO's DeQA reward reads it as
    `[s.item() for s in model.score(images)]`.
    """
    import torch                                                  # DeQA-Score's environment: torch 2.0.1
    from transformers import AutoModelForCausalLM                 # transformers 4.36.1
    net = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True, attn_implementation="eager",
                                               torch_dtype=getattr(torch, dtype), device_map=device)
    net.eval()
    net.requires_grad_(False)

    def score(images, prompts):
        with torch.inference_mode():
            out = net.score(list(images))
        if hasattr(out, "detach"): out = out.detach().float().reshape(-1).cpu().tolist()
        return [float(s) for s in out]
    return score


# ------------------------------------------------------------------------------------------------ HTTP
class ScoreHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"          # one request per connection: a worker is freed when its answer is sent
    server_version = "deqa-reward-server/1"

    def setup(self):
        self.timeout = self.server.opts.timeout        # idle clients: every socket read/write times out after this
        BaseHTTPRequestHandler.setup(self)
        self._request_in = False
        self._watchdog = threading.Timer(self.server.opts.request_deadline, self._too_slow)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _too_slow(self):
        "A client still sending its request after --request-deadline seconds (slow drip) is cut off."
        if not self._request_in:
            self.log_message("cut off: request not received within %.0f s", self.server.opts.request_deadline)
            try: self.connection.shutdown(socket.SHUT_RDWR)
            except OSError: pass

    def finish(self):
        self._watchdog.cancel()
        try: BaseHTTPRequestHandler.finish(self)
        except OSError: pass

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s %s\n" % (time.strftime("%H:%M:%S"), self.address_string(), fmt % args))

    def log_request(self, code="-", size="-"):
        if self.server.opts.verbose or (isinstance(code, int) and code >= 400):
            BaseHTTPRequestHandler.log_request(self, code, size)

    def _reply(self, code, payload, unread=0):
        payload = dict(payload, scorer=self.server.scorer_name)
        body = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            return
        if unread: drain_and_close(self.connection, unread, min(self.server.opts.timeout, 5.0))

    def send_error(self, code, message=None, explain=None):
        "The stdlib's own errors (bad request line, headers too large, unsupported method) as JSON too."
        self.close_connection = True
        self._request_in = True
        self._error(int(code), message or self.responses.get(code, ("error",))[0])

    def _error(self, code, message, unread=0):
        if code >= 500 or self.server.opts.verbose: self.log_message("%d %s", code, message)
        self._reply(code, {"error": message}, unread)

    def do_GET(self):
        self._request_in = True
        if self.path.split("?")[0].rstrip("/") == "/health": return self._reply(200, {"status": "ok"})
        self._error(404, "no endpoint GET %r; POST /score (or GET /health)" % self.path)

    def do_POST(self):
        length = self.headers.get("Content-Length")
        try: declared = int(length) if length is not None else -1
        except ValueError: declared = -1
        if self.path.split("?")[0].rstrip("/") != "/score":
            return self._error(404, "no endpoint %r; POST /score" % self.path, unread=max(declared, 0))
        if self.headers.get("Transfer-Encoding") or length is None:
            return self._error(411, "send the body with a Content-Length header (no chunked encoding)",
                               unread=self.server.opts.max_request_bytes)
        if declared < 0:
            return self._error(400, "bad Content-Length %r" % length, unread=self.server.opts.max_request_bytes)
        if declared > self.server.opts.max_request_bytes:
            return self._error(413, "request body of %d bytes is above the limit of %d bytes (--max-request-bytes); "
                                    "send fewer or smaller images per request" % (declared, self.server.opts.max_request_bytes),
                               unread=declared)
        body = bytearray(declared)
        view, got = memoryview(body), 0
        try:
            while got < declared:
                n = self.rfile.readinto(view[got:got + (1 << 20)])
                if not n: break
                got += n
        except (socket.timeout, OSError):
            pass
        view.release()
        self._request_in = True
        self._watchdog.cancel()
        if got < declared:
            self.log_message("dropped: %d of %d body bytes received", got, declared)
            return self._error(408, "request body incomplete: %d of %d bytes arrived" % (got, declared))
        try:
            encoded = parse_request(body, self.server.opts)
            del body
            self._reply(200, {"scores": self.server.score_encoded(encoded)})
        except RequestError as e:
            self._error(e.code, str(e))
        except Exception as e:
            self._error(500, "%s: %s" % (type(e).__name__, e))


def drain_and_close(sock, budget, seconds):
    "Half-close and read away up to `budget` unread request bytes for `seconds`, so the client gets our answer, not a reset."
    try:
        sock.shutdown(socket.SHUT_WR)
        end = time.monotonic() + seconds
        while budget > 0 and time.monotonic() < end:
            sock.settimeout(max(0.05, end - time.monotonic()))
            chunk = sock.recv(1 << 16)
            if not chunk: break
            budget -= len(chunk)
    except OSError:
        pass


class BoundedHTTPServer(ThreadingHTTPServer):
    "ThreadingHTTPServer with at most `workers` connections in flight; the model scores one batch at a time."
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, opts, scorer, scorer_name):
        self.opts, self.scorer, self.scorer_name = opts, scorer, scorer_name
        self.slots = threading.BoundedSemaphore(opts.workers)
        self.reject_slots = threading.BoundedSemaphore(4)   # threads that answer 503 (and drain) when all are busy
        self.model_lock = threading.Lock()
        if ":" in opts.host: self.address_family = socket.AF_INET6
        ThreadingHTTPServer.__init__(self, (opts.host, opts.port), ScoreHandler)

    def server_bind(self):      # HTTPServer.server_bind would do a reverse DNS lookup (getfqdn) of the host
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]

    @property
    def url(self):
        host, port = self.server_address[0], self.server_address[1]
        return "http://%s:%d/score" % ("[%s]" % host if ":" in host else host, port)

    def process_request(self, request, client_address):
        # Runs in the accepting thread: while every worker is busy, new connections wait here (and in the listen
        # backlog) for up to --queue-timeout seconds, then get 503.
        if not self.slots.acquire(timeout=self.opts.queue_timeout):
            return self.reject_busy(request)
        try:
            ThreadingHTTPServer.process_request(self, request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            ThreadingHTTPServer.process_request_thread(self, request, client_address)
        finally:
            self.slots.release()

    def reject_busy(self, request):
        if not self.reject_slots.acquire(blocking=False):
            return self.shutdown_request(request)
        body = json.dumps({"error": "server busy: all %d workers stayed busy for %.0f s (--workers, --queue-timeout); retry later"
                                    % (self.opts.workers, self.opts.queue_timeout), "scorer": self.scorer_name}).encode()
        head = ("HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                "Retry-After: 5\r\nConnection: close\r\n\r\n" % len(body)).encode()

        def answer():
            try:
                request.settimeout(1.0)
                request.sendall(head + body)
                drain_and_close(request, 1 << 24, 1.0)
            except OSError:
                pass
            finally:
                self.reject_slots.release()
                self.shutdown_request(request)
        threading.Thread(target=answer, daemon=True).start()

    def score_encoded(self, encoded):
        "Scores of the (header-checked) encoded images: decoded and scored --batch-size at a time under the model lock."
        scores = []
        for start in range(0, len(encoded), self.opts.batch_size):
            images = [decode_image(start + j, data, self.opts.max_pixels)
                      for j, data in enumerate(encoded[start:start + self.opts.batch_size])]
            with self.model_lock:
                batch = self.scorer(images, None)
            batch = [float(s) for s in batch]
            if len(batch) != len(images):
                raise RuntimeError("scorer returned %d scores for %d images" % (len(batch), len(images)))
            bad = [s for s in batch if not math.isfinite(s)]
            if bad: raise RuntimeError("scorer returned non-finite scores %r" % bad[:4])
            scores.extend(batch)
        return scores


# ------------------------------------------------------------------------------------------------ main
def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0: raise argparse.ArgumentTypeError("must be > 0, got %s" % text)
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve DeQA-Score image-quality scores to apex_nb's deqa reward over HTTP.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; keep loopback unless you mean to expose the GPU")
    p.add_argument("--port", type=int, default=18086, help="port (0 = any free port; the URL is printed)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="DeQA-Score checkpoint: hub id or local folder")
    p.add_argument("--device", default="auto", help='device_map for from_pretrained: "auto", "cuda:0", "cpu", ...')
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="torch dtype of the model")
    p.add_argument("--batch-size", type=positive(int), default=8, help="images per model.score call")
    p.add_argument("--workers", type=positive(int), default=4, help="connections handled at once")
    p.add_argument("--queue-timeout", type=positive(float), default=60.0,
                   help="seconds a connection waits for a free worker before a 503")
    p.add_argument("--timeout", type=positive(float), default=30.0, help="seconds a client may stay idle before it is dropped")
    p.add_argument("--request-deadline", type=positive(float), default=300.0,
                   help="seconds a client has to send its whole request")
    p.add_argument("--max-request-bytes", type=positive(int), default=64 << 20, help="largest request body (413 above)")
    p.add_argument("--max-pixels", type=positive(int), default=4096 * 4096, help="largest width × height of one image (413 above)")
    p.add_argument("--max-images", type=positive(int), default=256, help="most images in one request (413 above)")
    p.add_argument("--stand-in", action="store_true",
                   help="no model: score 1 + 4 × mean brightness, to test the protocol without weights or a GPU")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr (default: errors only)")
    return p.parse_args(argv)


def is_loopback(host):
    try: return ipaddress.ip_address(host).is_loopback
    except ValueError: return host == "localhost"


def main(argv=None):
    opts = parse_args(argv)
    if opts.stand_in:
        print("deqa_reward_server: STAND-IN scorer (%s), NOT DeQA-Score: for testing the protocol only" % STAND_IN, flush=True)
        scorer, name = stand_in_scorer, STAND_IN
    else:
        scorer, name = None, "DeQA-Score: %s" % opts.model
    if not is_loopback(opts.host):
        print("deqa_reward_server: WARNING: binding %s, not a loopback address: anyone who can reach it can use this "
              "server (there is no authentication)" % opts.host, flush=True)
    httpd = BoundedHTTPServer(opts, scorer, name)         # bind first: a busy port fails before minutes of loading
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        if scorer is None:
            print("deqa_reward_server: loading %s (device_map=%s, %s) ..." % (opts.model, opts.device, opts.dtype), flush=True)
            httpd.scorer = load_deqa_scorer(opts.model, opts.device, opts.dtype)
        print("deqa_reward_server: scorer %r, batch size %d, %d workers" % (name, opts.batch_size, opts.workers), flush=True)
        print("deqa_reward_server: listening on %s" % httpd.url, flush=True)
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
