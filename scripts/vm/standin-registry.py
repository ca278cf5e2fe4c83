#!/usr/bin/env python3
"""Test only (testkit/tests/node_vm.rs): the node's images without any registry.

  standin-registry.py serve --busybox PATH --tag TAG --listen 127.0.0.1:PORT [--env K=V]...
      Builds the stand-in images kaitu/k2s:TAG and kaitu/k2-sidecar:TAG (one layer: a static
      busybox and scripts/vm/standin/*.sh) and serves them read-only over the registry HTTP
      API (v2: manifests and blobs). The VM's dockerd uses it as its registry mirror, so the
      node's docker-compose.yml pulls its real image names (pinned by the digests it prints)
      unchanged. Prints "listening on PORT" first, then "pin VARIANT NAME@DIGEST" for every
      image of every variant, then one line per request. Variants, for auto-update.sh's test:
      `base` (what TAG serves at first), `good` (the same scripts, another image config: a
      new digest that runs) and `bad` (the sidecar exits at once; k2s as in base).
      `POST /admin/tag/VARIANT` makes TAG serve that variant (every digest stays served).
  standin-registry.py base-tar OUT
      A root file system for `docker import`: what distroless/static:nonroot holds that a
      static binary needs (/etc/passwd and /etc/group with nonroot 65532, CA certificates,
      /tmp), the local base image of deploy/Dockerfile's runtime stage.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
APPLETS = "sh ash awk base64 cat cut date head nc printf sed sleep tr wc".split()


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def add(tar, name, data=None, mode=0o644, kind=tarfile.REGTYPE, link="", uid=0):
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid = info.gid = uid
    info.mtime = 0
    info.type = kind
    info.linkname = link
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def standin_layer(busybox):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        for d in ("bin", "tmp", "host", "etc"):
            add(t, d, mode=0o1777 if d == "tmp" else 0o755, kind=tarfile.DIRTYPE)
        with open(busybox, "rb") as f:
            add(t, "bin/busybox", f.read(), mode=0o755)
        for a in APPLETS:
            add(t, "bin/" + a, kind=tarfile.SYMTYPE, link="busybox")
        add(t, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        for script in ("k2s.sh", "k2-sidecar.sh"):
            with open(os.path.join(HERE, "standin", script), "rb") as f:
                add(t, script, f.read(), mode=0o755)
    return raw.getvalue()


def image(layer_tar, layer_gz, cmd, env):
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/bin"] + env, "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/vm/standin-registry.py"}],
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": len(config), "digest": sha(config)},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": len(layer_gz), "digest": sha(layer_gz)}],
        },
        sort_keys=True,
    ).encode()
    return config, manifest


def serve(args):
    layer_tar = standin_layer(args.busybox)
    layer_gz = gzip.compress(layer_tar, mtime=0)
    blobs = {sha(layer_gz): layer_gz}
    manifests = {}
    variants = {}
    pins = []
    for variant in ("base", "good", "bad"):
        for name, script in (("kaitu/k2s", "/k2s.sh"), ("kaitu/k2-sidecar", "/k2-sidecar.sh")):
            cmd, env = ["/bin/sh", script], list(args.env)
            if variant == "good":
                env.append("STANDIN_VARIANT=good")
            if variant == "bad" and name == "kaitu/k2-sidecar":
                cmd = ["/bin/sh", "-c", "echo stand-in bad image; exit 3"]
            config, manifest = image(layer_tar, layer_gz, cmd, env)
            blobs[sha(config)] = config
            manifests[(name, sha(manifest))] = manifest
            variants[(variant, name)] = manifest
            pins.append(f"pin {variant} {name}@{sha(manifest)}")
    current = {"variant": "base"}

    def by_tag(name):
        return variants.get((current["variant"], name))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            pass

        def answer(self, code, body=b"", ctype="application/json", digest=None):
            sys.stdout.write(f"{time.time():.3f} {self.command} {self.path} {code}\n")
            sys.stdout.flush()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            if digest:
                self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def route(self):
            p = self.path.split("?", 1)[0]
            if p in ("/v2", "/v2/"):
                return self.answer(200, b"{}")
            if p.startswith("/v2/") and "/manifests/" in p:
                name, ref = p[4:].split("/manifests/", 1)
                m = by_tag(name) if ref == args.tag else manifests.get((name, ref))
                if m is not None:
                    return self.answer(200, m, MANIFEST_V2, sha(m))
                return self.answer(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}')
            if p.startswith("/v2/") and "/blobs/" in p:
                digest = p.rsplit("/blobs/", 1)[1]
                b = blobs.get(digest)
                if b is not None:
                    return self.answer(200, b, "application/octet-stream", digest)
                return self.answer(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}')
            return self.answer(404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}')

        def do_GET(self):
            self.route()

        def do_HEAD(self):
            self.route()

        def do_POST(self):
            v = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
            if self.path.startswith("/admin/tag/") and v in ("base", "good", "bad"):
                current["variant"] = v
                return self.answer(200, b"{}")
            return self.answer(404, b"{}")

    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    sys.stdout.write(f"listening on {server.server_address[1]}\n")
    for line in pins:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    server.serve_forever()


def base_tar(args):
    with tarfile.open(args.out, mode="w", format=tarfile.GNU_FORMAT) as t:
        for d, mode in (("etc", 0o755), ("etc/ssl", 0o755), ("etc/ssl/certs", 0o755), ("tmp", 0o1777), ("home", 0o755)):
            add(t, d, mode=mode, kind=tarfile.DIRTYPE)
        add(t, "home/nonroot", mode=0o700, kind=tarfile.DIRTYPE, uid=65532)
        add(t, "etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
        add(t, "etc/group", b"root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n")
        with open("/etc/ssl/certs/ca-certificates.crt", "rb") as f:
            add(t, "etc/ssl/certs/ca-certificates.crt", f.read())


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--busybox", required=True)
    s.add_argument("--tag", required=True)
    s.add_argument("--listen", default="127.0.0.1:0")
    s.add_argument("--env", action="append", default=[])
    b = sub.add_parser("base-tar")
    b.add_argument("out")
    a = ap.parse_args()
    serve(a) if a.cmd == "serve" else base_tar(a)


if __name__ == "__main__":
    main()
