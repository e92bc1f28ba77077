"""`cxrfast serve`'s memory after uploads near the 64-megapixel limit, and whether it is the C allocator keeping it.

    .venv/bin/python docs/bench/serve_big_uploads.py RUN [--port 8715]

Starts `cxrfast serve RUN` three ways: as shipped (freed memory kept for reuse within a request, given back with
glibc's `malloc_trim(0)` after each: `cxr_fast.memory.give_back_freed_memory`); as before 2026-11-30, keeping it
(`give_back_freed_memory` patched out); and with CXRFAST_MALLOC=default (glibc's own behaviour, no reuse). Each time:
RSS at start, after one ordinary film, after four 7900 x 7900 PNGs sent at once (probabilities alone), after four
more, then after 20 ordinary films (and their time). Linux only.
"""

import argparse
import http.client
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
from PIL import Image
from serve_soak import wait_until_serving  # the script beside this one

BOUNDARY = "cxrfastbig"
KEEPING = ("import cxr_fast.serve as s; s.give_back_freed_memory = lambda: False; "
           "from cxr_fast.cli import main; main()")
SETTINGS = ("as shipped", "keeping freed memory", "CXRFAST_MALLOC=default")


def post(port, name, data):
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\r\n").encode() \
        + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/api/predict?heatmap=0", body,
                       {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    status = connection.getresponse().status
    connection.close()
    return status


def start(run, port, how):
    env = dict(os.environ, **({"CXRFAST_MALLOC": "default"} if how == "CXRFAST_MALLOC=default" else {}))
    command = ["-c", KEEPING] if how == "keeping freed memory" else ["-m", "cxr_fast.cli"]
    server = subprocess.Popen([sys.executable, *command, "serve", str(run), "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_until_serving(server, port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--port", type=int, default=8715)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side = 7900  # 62.4 megapixels, under the reader's 64-megapixel limit
    film = (np.add.outer(np.arange(side), np.arange(side)) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(film).save(buffer, format="PNG")
    big = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(buffer, format="PNG")
    small = buffer.getvalue()
    print(f"big upload: {side} x {side} PNG, {len(big) / 2**20:.1f} MB; ordinary: 512 x 512, {len(small) / 1e3:.0f} kB")
    for how in SETTINGS:
        server = start(args.run, args.port, how)
        process, row = psutil.Process(server.pid), []
        rss = lambda process=process: f"{process.memory_info().rss / 2**20:.0f}"  # noqa: E731
        try:
            row.append(rss())
            assert post(args.port, "small.png", small) == 200
            row.append(rss())
            for _ in range(2):
                with ThreadPoolExecutor(4) as pool:
                    statuses = list(pool.map(lambda i: post(args.port, f"big{i}.png", big), range(4)))
                assert statuses == [200] * 4, statuses
                row.append(rss())
            started = time.monotonic()
            for _ in range(20):
                post(args.port, "small.png", small)
            row.append(rss())
            row.append(f"{(time.monotonic() - started) / 20 * 1000:.0f}")
        finally:
            server.terminate()
            server.wait(60)
        print(f"{how:20s} RSS MiB: start {row[0]}, after 1 film {row[1]}, after 4 big at once {row[2]}, "
              f"4 more {row[3]}, 20 films later {row[4]} ({row[5]} ms a film)", flush=True)


if __name__ == "__main__":
    main()
