"""`cxrfast serve` as a long-running, shared process: memory and open files over many requests, several clients at
once, and how fast Ctrl-C / SIGTERM ends it with heatmaps queued.

    .venv/bin/python docs/bench/serve_soak.py RUN IMAGES_FOLDER [--requests 300] [--clients 6] [--port 8714]

Starts `cxrfast serve RUN` in a child process and talks to it over HTTP.

1. Soak: REQUESTS requests cycling through probabilities alone (`?heatmap=0`), heatmaps, a text file, a file named
   .png that is no image, a DICOM, and a 21 MB upload with and without a Content-Length; every 50 requests the
   server's RSS, open file descriptors, threads and upload folders (`cxrfast-upload-*`) in the temporary folder.
2. Concurrency: CLIENTS threads send 8 requests each (half with heatmaps) of distinct films; every answer must carry
   the probabilities `cxrfast predict` gives for that film. Latencies, then the page and a `?heatmap=0` request
   timed while 4 heatmaps are queued.
3. Shutdown: SIGINT and SIGTERM with 6 heatmaps in flight or queued: seconds to exit, exit code, answers.
"""

import argparse
import glob
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BOUNDARY = "cxrfastsoak"
HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def multipart(name: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def start(run, port):
    server = subprocess.Popen([sys.executable, "-m", "cxr_fast.cli", "serve", str(run), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_until_serving(server, port)


def wait_until_serving(server, port):
    """`server` once it answers on `port`; killed, and the script ended, if it has not within 3 minutes."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/api/model")
            connection.getresponse().read()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"serve did not start: {server.stdout.read() if server.stdout else ''}")


def post(port, name, data, heatmap, chunked=False, timeout=300):
    """(status or exception name, answer, seconds)."""
    body = multipart(name, data)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        if chunked:
            connection.request("POST", f"/api/predict?heatmap={heatmap}",
                               (body[k:k + 65536] for k in range(0, len(body), 65536)), HEADERS, encode_chunked=True)
        else:
            connection.request("POST", f"/api/predict?heatmap={heatmap}", body, HEADERS)
        response = connection.getresponse()
        answer = response.read()
        try:
            answer = json.loads(answer)
        except ValueError:
            pass
        return response.status, answer, time.monotonic() - started
    except OSError as e:
        return type(e).__name__, None, time.monotonic() - started
    finally:
        connection.close()


def soak(run, films, port, n):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import psutil

    from tests.conftest import write_dicom

    dicom = Path(tempfile.mkdtemp()) / "film.dcm"
    write_dicom(dicom, np.random.default_rng(0).random((128, 128)) * 4000)
    kinds = {
        "probabilities": lambda i: (films[i % len(films)].name, films[i % len(films)].read_bytes(), 0, False),
        "heatmap": lambda i: (films[i % len(films)].name, films[i % len(films)].read_bytes(), 1, False),
        "text": lambda i: ("notes.txt", b"not an x-ray\n" * 100, 0, False),
        "not-a-png": lambda i: ("scan.png", b"\x89PNG\r\n\x1a\n" + os.urandom(5000), 0, False),
        "dicom": lambda i: ("film.dcm", dicom.read_bytes(), 1, False),
        "21 MB": lambda i: ("big.png", bytes(21 * 1024 * 1024), 0, False),
        "21 MB chunked": lambda i: ("big.png", bytes(21 * 1024 * 1024), 0, True),
    }
    plan = ["probabilities"] * 4 + ["heatmap"] * 2 + ["text", "not-a-png", "dicom", "21 MB", "21 MB chunked"]
    temporary = lambda: set(glob.glob(tempfile.gettempdir() + "/cxrfast-upload-*"))  # noqa: E731
    before = temporary()
    server = start(run, port)
    process, statuses, started = psutil.Process(server.pid), {}, time.monotonic()

    def sample(i):
        print(f"{i:5d} requests  RSS {process.memory_info().rss / 2**20:6.1f} MiB  "
              f"fds {len(os.listdir(f'/proc/{server.pid}/fd')):3d}  threads {process.num_threads():3d}  "
              f"upload folders {len(temporary() - before)}  {time.monotonic() - started:6.1f} s", flush=True)

    try:
        sample(0)
        for i in range(1, n + 1):
            kind = plan[(i - 1) % len(plan)]
            name, data, heatmap, chunked = kinds[kind](i)
            status = post(port, name, data, heatmap, chunked)[0]
            statuses[f"{kind} {status}"] = statuses.get(f"{kind} {status}", 0) + 1
            if i % 50 == 0:
                sample(i)
        print("answers:", dict(sorted(statuses.items())))
    finally:
        server.terminate()
        server.wait(60)
    print(f"upload folders left after exit: {sorted(temporary() - before) or 'none'}")


def concurrency(run, films, port, clients):
    expected_file = Path(tempfile.mkdtemp()) / "expected.json"
    subprocess.run([sys.executable, "-m", "cxr_fast.cli", "predict", str(run), *map(str, films), "--out",
                    str(expected_file)], check=True, capture_output=True)
    expected = {Path(p["path"]).name: p for p in json.loads(expected_file.read_text())["predictions"]}
    server = start(run, port)
    try:
        for heatmap in (0, 1):
            times = [post(port, films[0].name, films[0].read_bytes(), heatmap)[2] for _ in range(3)]
            print(f"alone, heatmap={heatmap}: {min(times):.3f}-{max(times):.3f} s")
        failures, mismatches = [], []

        def job(i):
            film, heatmap = films[i % len(films)], i % 2
            status, answer, seconds = post(port, film.name, film.read_bytes(), heatmap)
            if status != 200:
                failures.append((film.name, status, answer))
            else:
                want = expected[film.name]
                if answer["filename"] != film.name or answer["predicted"] != want["predicted"] or max(
                        abs(p - want[f"p_{c}"]) for c, p in answer["probabilities"].items()) > 1e-5:
                    mismatches.append(film.name)
            return heatmap, seconds

        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(job, range(8 * clients)))
        for heatmap in (0, 1):
            times = sorted(s for h, s in results if h == heatmap)
            print(f"{clients} clients at once, heatmap={heatmap}: {len(times)} requests, median "
                  f"{times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s")
        print(f"{len(results)} requests in {time.monotonic() - started:.1f} s: {len(failures)} failed, "
              f"{len(mismatches)} answers not their film's {failures[:2]} {mismatches[:2]}")
        busy = [threading.Thread(target=post, args=(port, f.name, f.read_bytes(), 1)) for f in films[:4]]
        for thread in busy:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/")
        connection.getresponse().read()
        print(f"with 4 heatmaps queued: the page in {time.monotonic() - started:.3f} s, probabilities in "
              f"{post(port, films[5].name, films[5].read_bytes(), 0)[2]:.3f} s")
        for thread in busy:
            thread.join()
    finally:
        server.terminate()
        server.wait(60)


def shutdown(run, films, port):
    for name in ("SIGINT", "SIGTERM"):
        server, answers = start(run, port), []
        threads = [threading.Thread(target=lambda f=f, into=answers: into.append(
            post(port, f.name, f.read_bytes(), 1)[0]), daemon=True) for f in films[:6]]
        for thread in threads:
            thread.start()
        time.sleep(0.8)
        started = time.monotonic()
        server.send_signal(getattr(signal, name))
        try:
            code = server.wait(300)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed after 300 s"
        print(f"{name} with 6 heatmaps in flight or queued: exit code {code} after "
              f"{time.monotonic() - started:.1f} s; answers {sorted(map(str, answers))}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("images")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--port", type=int, default=8714)
    args = parser.parse_args()
    films = sorted(Path(args.images).rglob("*.jpg"))
    films = films[:: max(1, len(films) // 16)][:16]
    soak(args.run, films, args.port, args.requests)
    concurrency(args.run, films, args.port, args.clients)
    shutdown(args.run, films, args.port)


if __name__ == "__main__":
    main()
