"""Build the docs, open every page in headless Chromium, screenshot it and check what it shows.

    python docs/screenshots.py                      # build, serve, screenshot, check
    python docs/screenshots.py --out /tmp/shots --pages methods/ quickstart/
    python docs/screenshots.py --site site --no-build

For every page the script waits until MathJax has typeset the page, then reports

- raw mathematics: ``\\(``, ``\\[`` or ``$$`` left in the page's text outside code (a formula
  the renderer did not typeset), and MathJax's own errors (``mjx-merror``: TeX it could not
  parse);
- raw Sphinx roles (``:class:`...```) and reST markers left in the text;
- requests that left 127.0.0.1 (the site must work without the network) and requests the
  local server answered with 404;
- links to an anchor that no page defines.

The screenshots (``<page>-NN.png``, the page cut into tiles of ``--height`` pixels) go to
``--out`` with ``report.json``; the exit status is 1 when a check failed. Needs Chromium
(``apt-get install chromium``); it talks to it over the DevTools pipe, so no other package is
needed. Not run by CI when Chromium is absent (``tests/test_docs.py`` skips it).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]

#: Runs in the page once MathJax is done; returns what the page shows.
CHECKS_JS = r"""
(() => {
  const skip = new Set(["CODE", "PRE", "SCRIPT", "STYLE", "MJX-CONTAINER", "TEXTAREA"]);
  const texts = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    let el = node.parentElement, hidden = false;
    for (; el; el = el.parentElement) {
      if (skip.has(el.tagName)) { hidden = true; break; }
    }
    if (!hidden) texts.push(node.textContent);
  }
  const text = texts.join(" ");
  const around = (re) => {
    const found = [];
    for (const m of text.matchAll(re)) {
      found.push(text.slice(Math.max(0, m.index - 40), m.index + 60).replace(/\s+/g, " "));
      if (found.length >= 5) break;
    }
    return found;
  };
  const anchors = [...document.querySelectorAll("a[href]")].map((a) => a.href);
  return {
    title: document.title,
    mathjax: document.querySelectorAll("mjx-container").length,
    empty_math: [...document.querySelectorAll("mjx-container")].filter((e) =>
      e.getBoundingClientRect().width === 0 || !e.querySelector("path, use")
    ).map((e) => e.parentElement.textContent.slice(0, 60)).slice(0, 5),
    arithmatex: document.querySelectorAll(".arithmatex").length,
    merror: [...document.querySelectorAll("mjx-merror")].map((e) => e.textContent).slice(0, 5),
    raw_math: around(/\\\(|\\\[|\$\$|\\frac|\\lambda|\\nabla/g),
    raw_roles: around(/:(class|meth|func|attr|mod|data|exc|obj):`/g),
    raw_rst: around(/``|\.\. (note|math|code-block)::/g),
    ids: [...document.querySelectorAll("[id]")].map((e) => e.id),
    links: anchors,
    resources: performance.getEntriesByType("resource").map((r) => r.name),
    height: Math.ceil(document.documentElement.scrollHeight),
  };
})()
"""


class Browser:
    """A headless Chromium driven over the DevTools pipe (file descriptors 3 and 4)."""

    def __init__(self, executable: str, width: int, height: int) -> None:
        self.profile = tempfile.mkdtemp(prefix="bilevel-docs-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4 (placed in the child).
        command = [
            executable,
            *FLAGS,
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            command,
            pass_fds=(3, 4),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=functools.partial(_place_pipes, to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.send("Page.enable", session=True)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events are queued)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> None:
        """Wait for the event ``method`` (already queued or still to come)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    del self.events[i]
                    return
            self.events.append(self._read())
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str, timeout_ms: int = 20000) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate",
            session=True,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            timeout=timeout_ms,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Navigate and wait for the load event, then for MathJax when the page has it."""
        self.events.clear()
        self.send("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")
        self.evaluate(
            "(window.MathJax && MathJax.startup && MathJax.startup.promise) ? "
            "MathJax.startup.promise.then(() => true) : Promise.resolve(false)"
        )
        self.evaluate("document.fonts.ready.then(() => true)")

    def screenshot(self, path: Path, top: int, width: int, height: int) -> None:
        """A PNG of the page from ``top``, ``width`` x ``height`` CSS pixels."""
        data = self.send(
            "Page.captureScreenshot",
            session=True,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": top, "width": width, "height": height, "scale": 1},
        )["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Quit Chromium and remove its profile."""
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


def _place_pipes(read_end: int, write_end: int) -> None:
    """In the child: the command pipe on fd 3, the reply pipe on fd 4 (moved above 10 first,
    so that neither overwrites the other)."""
    high_read = fcntl.fcntl(read_end, fcntl.F_DUPFD, 10)
    high_write = fcntl.fcntl(write_end, fcntl.F_DUPFD, 10)
    os.dup2(high_read, 3)
    os.dup2(high_write, 4)


def find_browser() -> str | None:
    """The Chromium executable, or ``None``."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class Server:
    """The built site on 127.0.0.1, recording every request and every 404."""

    def __init__(self, site: Path) -> None:
        self.requests: list[str] = []
        self.missing: list[str] = []
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(site), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def send_error(self, code: int, *args: Any, **kwargs: Any) -> None:
                if code == 404:
                    outer.missing.append(self.path)
                super().send_error(code, *args, **kwargs)

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def build(site: Path, strict: bool) -> None:
    """``mkdocs build`` into ``site``."""
    command = [sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(site)]
    if strict:
        command.insert(4, "--strict")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run(command, cwd=ROOT, check=True, env=env)


def pages_of(site: Path) -> list[str]:
    """Every page of the site, as a path relative to its root (``""`` is the home page)."""
    found = []
    for path in sorted(site.rglob("index.html")):
        relative = path.parent.relative_to(site).as_posix()
        if relative.split("/", 1)[0] in ("assets", "search"):
            continue
        found.append("" if relative == "." else relative + "/")
    return found


def check_site(
    site: Path,
    out: Path,
    pages: list[str] | None = None,
    width: int = 1280,
    height: int = 1400,
    max_tiles: int = 12,
    screenshots: bool = True,
) -> dict[str, Any]:
    """Open every page in Chromium; screenshots in ``out``; the findings as a dict (``problems``
    lists what failed)."""
    executable = find_browser()
    if executable is None:
        raise SystemExit("Chromium is not installed: apt-get install chromium")
    out.mkdir(parents=True, exist_ok=True)
    server = Server(site)
    browser = Browser(executable, width, height)
    report: dict[str, Any] = {"pages": {}, "problems": [], "screenshots": []}
    ids: dict[str, set[str]] = {}
    links: list[tuple[str, str]] = []
    try:
        for page in pages if pages is not None else pages_of(site):
            url = server.url + page
            browser.open(url)
            found = browser.evaluate(CHECKS_JS)
            name = page.strip("/").replace("/", "-") or "index"
            ids[page] = set(found.pop("ids"))
            links += [(page, link) for link in found.pop("links")]
            outside = [r for r in found.pop("resources") if not r.startswith(server.url)]
            found["outside_requests"] = outside
            report["pages"][page] = found
            for key, what in (
                ("raw_math", "raw mathematics"),
                ("merror", "a TeX error of MathJax"),
                ("empty_math", "a formula typeset with no visible glyph"),
                ("raw_roles", "a raw Sphinx role"),
                ("raw_rst", "raw reST markup"),
                ("outside_requests", "a request that leaves 127.0.0.1"),
            ):
                if found[key]:
                    report["problems"].append(f"{page or 'index'}: {what}: {found[key]}")
            if found["arithmatex"] and not found["mathjax"]:
                report["problems"].append(f"{page or 'index'}: formulas were not typeset")
            if screenshots:
                tiles = min(max_tiles, -(-found["height"] // height))
                for tile in range(tiles):
                    path = out / f"{name}-{tile + 1:02d}.png"
                    top = tile * height
                    browser.screenshot(path, top, width, min(height, found["height"] - top))
                    report["screenshots"].append(str(path))
    finally:
        browser.close()
        server.close()
    for page, link in links:
        if not link.startswith(server.url) or "#" not in link:
            continue
        target, _, anchor = link[len(server.url) :].partition("#")
        target = target.removesuffix("index.html")
        if target in ids and anchor and anchor not in ids[target]:
            report["problems"].append(f"{page or 'index'}: link to a missing anchor: {link}")
    missing = sorted(set(server.missing) - {"/favicon.ico"})
    report["problems"] += [f"the local server had no {path}" for path in missing]
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bilevel-docs-screenshots", help="PNG folder")
    parser.add_argument("--site", default=None, help="a built site (default: build one)")
    parser.add_argument("--no-build", action="store_true", help="use --site as it is")
    parser.add_argument("--no-strict", action="store_true", help="build without --strict")
    parser.add_argument("--pages", nargs="*", default=None, help='e.g. "" methods/ api/')
    parser.add_argument("--width", type=int, default=1280, help="CSS pixels")
    parser.add_argument("--height", type=int, default=1400, help="CSS pixels per tile")
    parser.add_argument("--max-tiles", type=int, default=12, help="tiles per page at most")
    args = parser.parse_args(argv)
    if args.no_build and args.site is None:
        parser.error("--no-build needs --site")
    with tempfile.TemporaryDirectory(prefix="bilevel-docs-site-") as tmp:
        site = Path(args.site) if args.site else Path(tmp) / "site"
        if not args.no_build:
            build(site, strict=not args.no_strict)
        out = Path(args.out)
        for old in out.glob("*.png"):
            old.unlink()
        report = check_site(
            site, out, args.pages, args.width, args.height, args.max_tiles, screenshots=True
        )
    (out / "report.json").write_text(json.dumps(report, indent=1))
    for page, found in report["pages"].items():
        print(
            f"{page or 'index':28} formulas typeset {found['mathjax']:4d}  "
            f"height {found['height']:6d} px"
        )
    print(f"{len(report['screenshots'])} screenshots in {out}")
    for problem in report["problems"]:
        print("PROBLEM:", problem)
    print("no problem found" if not report["problems"] else f"{len(report['problems'])} problems")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
