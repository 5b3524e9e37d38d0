"""The running app through its HTTP API (gradio_client and raw requests), as another program would use it."""

import os
import re
import shutil
import threading

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from ui_helpers import SETTINGS, free_port, http_status, in_folder, same_image

# Adapter names that must never reach a file (RELIABILITY.md U2, the CVE-2024-47868 pattern).
PAYLOADS = [
    "../x", "../../etc/passwd", "/etc/passwd", "%2e%2e/secret", "..%2fsecret", "....//....//etc/passwd",
    "C:\\x", "C:\\Windows\\win.ini", "\\\\server\\share\\x", "x::$DATA", "style_a::$DATA", "style_a\x00",
    "style_a\x00.safetensors", "style_a.safetensors", "style_a/../../outside/secret", "../outside/secret",
    "secret", "escape", "notes", "notes.pt", "file:///etc/passwd", "~/.ssh/id_rsa", "", " style_a", "style_a\n",
    "ｓｔｙｌｅ＿ａ", "broken", "foreign",
]


def generate(client, prompt="a red circle", seed=0, merge=False):
    """/generate with the test settings; returns (first image path, parameters text)."""
    s = SETTINGS
    images, used, text = client.predict(prompt, "", s["steps"], s["guidance"], seed, False, s["width"], s["height"],
                                        "model default", 1, merge, api_name="/generate")
    assert used == seed
    return images[0]["image"], text


def set_blend(client, weights: dict):
    for name, w in weights.items():
        client.predict(name, True, w, None, api_name="/set_adapter")


def test_the_app_listens_on_loopback_only_and_shares_nothing(app_url):
    assert app_url.startswith("http://127.0.0.1:")


def test_api_blends_equal_the_librarys_blending(client, expected):
    set_blend(client, {"style_a": 0.8, "style_b": -0.5})
    image, text = generate(client)
    assert same_image(image, expected({"style_a": 0.8, "style_b": -0.5}))
    assert "<lora:style_a:0.8> <lora:style_b:-0.5>" in text
    set_blend(client, {"style_a": 1.4})  # a new weight: the next image uses it
    image, _ = generate(client, merge=True)
    assert same_image(image, expected({"style_a": 1.4, "style_b": -0.5}), tol=2)
    client.predict("style_b", False, -0.5, None, api_name="/set_adapter")  # disable
    image, _ = generate(client, prompt="a red circle <lora:style_b:0.3>", seed=4)
    assert same_image(image, expected({"style_a": 1.4, "style_b": 0.3}, seed=4))


def test_api_grid_row_equals_single_generations(client, expected):
    s = SETTINGS
    set_blend(client, {"style_b": 0.5})
    grid, cells, notes = client.predict("a red circle", "", s["steps"], s["guidance"], 7, s["width"], s["height"],
                                        "model default", "style_a", "0, 0.5, 1", "", "", api_name="/grid")
    assert "3 images in one batch" in notes and grid.endswith(".png")
    for cell, w in zip(cells, (0, 0.5, 1)):
        assert cell["caption"] == f"style_a {w:g}"
        set_blend(client, {"style_a": w})
        single, _ = generate(client, seed=7)
        assert same_image(cell["image"], single)


def test_paths_and_other_files_are_refused_without_reading_anything(client, ui_files, audit_opens):
    s = SETTINGS
    folder, outside = ui_files["adapters"], ui_files["outside"]
    (folder / "style_a.safetensors").open("rb").close()
    assert str(folder / "style_a.safetensors") in audit_opens  # the hook sees opens (a positive control)
    audit_opens.clear()
    grid = ("a red circle", "", s["steps"], s["guidance"], 0, s["width"], s["height"], "model default")
    requests = []
    for i, name in enumerate(PAYLOADS):
        # Every entry point that takes a name: the blend, the card, the prompt's <lora:...> tag...
        requests += [((name, True, 1.0, None), "/set_adapter"), ((name,), "/card")]
        if ":" not in name and ">" not in name:
            requests.append((("x <lora:" + name + ":1>", "", 2, 3, 0, False, 32, 32, "model default", 1, False),
                             "/generate"))
        if i % 3 == 0:  # ...and, for a third of them, the grid axes and the export names
            requests += [(grid + (name, "0, 1", "", ""), "/grid"), (grid + ("style_a", "0", name, "1"), "/grid"),
                         ((name, "exact", 4, "kohya"), "/export_adapter"), ((name,), "/bake")]
    jobs = [(client.submit(*args, api_name=api), args, api) for args, api in requests]
    accepted = []
    for job, args, api in jobs:
        try:
            job.result(timeout=60)
            accepted.append((api, args))
        except AppError:
            pass
    assert accepted == [] and len(PAYLOADS) >= 20 and len(jobs) >= 3 * len(PAYLOADS)
    named = ("passwd", "secret", "notes", "escape", "win.ini", "id_rsa", "$DATA")
    opened = [p for p in audit_opens if in_folder(p, folder) or in_folder(p, outside) or any(n in p for n in named)]
    assert opened == []  # 0 reads: not the adapters, not what the payloads name
    assert sorted(p.name for p in outside.iterdir()) == ["secret.safetensors"]  # nothing written outside either


def test_gradio_file_route_serves_only_its_cache(app_url, client, ui_files, session):
    image, _ = generate(client)
    assert http_status(f"{app_url}gradio_api/file={image}") == 200  # the gallery's own copy
    for path in ["/etc/passwd", ui_files["adapters"] / "style_a.safetensors", ui_files["model"] / "model_index.json",
                 ui_files["outside"] / "secret.safetensors", "/tmp/gradio/../../etc/passwd", "..%2f..%2fetc%2fpasswd"]:
        assert http_status(f"{app_url}gradio_api/file={path}") in (403, 404), path


def test_a_bad_upload_is_a_message_and_the_folder_is_unchanged(client, session, tmp_path):
    import os

    before = sorted(os.listdir(session.catalogue.folder))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all}")
    with pytest.raises(AppError, match="junk.safetensors: malformed safetensors header"):
        client.predict(handle_file(str(junk)), api_name="/upload")
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (2 * 2**20))  # over the 1 MB limit: refused by Gradio before it is stored
    with pytest.raises(Exception):
        client.predict(handle_file(str(big)), api_name="/upload")
    assert sorted(os.listdir(session.catalogue.folder)) == before


def test_concurrent_users_each_get_their_own_blend(app_url, expected):
    from gradio_client import Client

    blends = [{"style_a": 1.0}, {"style_a": -1.0, "style_b": 1.0}, {}]
    clients = [Client(app_url, verbose=False) for _ in blends]
    for c, b in zip(clients, blends):
        set_blend(c, b)
    s = SETTINGS
    jobs = [c.submit("a red circle", "", s["steps"], s["guidance"], 0, False, s["width"], s["height"],
                     "model default", 1, False, api_name="/generate") for c in clients for _ in range(2)]
    results = [j.result(timeout=60) for j in jobs]
    for i, (images, _, _) in enumerate(results):
        assert same_image(images[0]["image"], expected(blends[i // 2])), blends[i // 2]


def test_a_blend_change_during_a_generation_does_not_touch_it(client, session, expected):
    """U5: the generation holds the pipeline; a weight change and a refresh meanwhile wait for the next one."""
    started, release = threading.Event(), threading.Event()

    def pause(module, args):
        if not started.is_set():
            started.set()
            release.wait(30)
    handle = session.pipe.unet.register_forward_pre_hook(pause)
    try:
        set_blend(client, {"style_a": 0.9})
        s = SETTINGS
        job = client.submit("a red circle", "", s["steps"], s["guidance"], 0, False, s["width"], s["height"],
                            "model default", 1, False, api_name="/generate")
        assert started.wait(30)
        set_blend(client, {"style_a": -0.9, "style_b": 1.0})  # answered while the generation runs
        client.predict(api_name="/refresh")
        release.set()
        images, _, _ = job.result(timeout=60)
    finally:
        release.set()
        handle.remove()
    assert same_image(images[0]["image"], expected({"style_a": 0.9}))
    image, _ = generate(client)
    assert same_image(image, expected({"style_a": -0.9, "style_b": 1.0}))


def test_a_broken_adapter_does_not_break_the_others(client, expected):
    with pytest.raises(AppError, match="broken.*incomplete safetensors"):
        client.predict("broken", True, 1.0, None, api_name="/set_adapter")
    card = client.predict("style_a", api_name="/card")
    assert "rank: 4; alpha: 2" in card and "attn2.to_q ×" in card
    set_blend(client, {"style_a": 0.5})
    image, _ = generate(client)
    assert same_image(image, expected({"style_a": 0.5}))


def test_the_outputs_folder_is_never_served_only_the_copies_the_page_shows(app_url, client, session):
    """--outputs may be a broad folder (a home directory): /file= serves none of it, not even the app's own
    images there; the page gets copies in Gradio's cache."""
    image, _ = generate(client)
    name = os.path.basename(image)
    written = session.outputs / name
    assert written.is_file()  # the app wrote it...
    (session.outputs / "private").mkdir(exist_ok=True)
    planted = [session.outputs / "notes.txt", session.outputs / "private" / "photo.png", session.outputs / "x.png"]
    for path in planted:
        path.write_bytes(b"not the app's")
    try:
        for path in [written, *planted]:  # ...and neither it nor anything else under --outputs is served
            assert http_status(f"{app_url}gradio_api/file={path}") == 403, path
        assert http_status(f"{app_url}gradio_api/file={image}") == 200  # the gallery's own copy
    finally:
        shutil.rmtree(session.outputs / "private")
        for path in planted[::2]:
            path.unlink()


@pytest.fixture(scope="module")
def authed(session):
    """A second app on the same session, with a login."""
    from ui.app import build_app, start

    demo = build_app(session)
    url = start(session, demo, port=free_port(), auth="me:secret")
    yield url, demo
    demo.close()


def test_with_auth_every_route_answers_401_without_the_login(authed):
    """Each route the server has (Gradio's queue, cancel, reset, heartbeat, file, upload... and any added
    later), by plain HTTP without credentials: 401. Only the login form is open."""
    import requests
    from starlette.routing import Mount

    url, demo = authed
    tried = []
    for prefix, route in _routes(demo.server_app.routes):
        path = prefix + re.sub(r"\{[^}]*\}", "x", route.path) + ("/x" if isinstance(route, Mount) else "")
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if path.rstrip("/") == "/login" and method == "POST":
                continue
            r = requests.request(method, url.rstrip("/") + path, json={}, timeout=10, allow_redirects=False)
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            tried.append(path)
    for must in ("/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/queue/join", "/gradio_api/queue/data",
                 "/gradio_api/heartbeat/x", "/gradio_api/file=x", "/gradio_api/upload", "/config", "/",
                 "/gradio_api/startup-events", "/theme.css", "/gradio_api/info"):
        assert must in tried, must
    assert len(set(tried)) >= 40
    page = requests.get(url, timeout=10)
    assert page.status_code == 401 and '<form id="f"' in page.text and "generate" not in page.text  # no API info
    assert requests.post(url + "login", data={"username": "me", "password": "wrong"}, timeout=10).status_code == 400

    logged_in = requests.Session()
    assert logged_in.post(url + "login", data={"username": "me", "password": "secret"}, timeout=10).ok
    assert logged_in.get(url + "config", timeout=10).status_code == 200
    assert logged_in.get(url, timeout=10).status_code == 200
    table = Client(url, auth=("me", "secret"), verbose=False).predict(api_name="/refresh")
    assert {row[0] for row in table["data"]} >= {"style_a", "style_b"}


def _routes(routes, prefix=""):
    """(prefix, route) of every route, routers included into the app flattened."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes, prefix + route.include_context.prefix)
        else:
            yield prefix, route


def test_interrupt_through_the_api_and_the_next_user_is_served(app_url, session):
    import time

    steps = []

    def slow(module, args):
        steps.append(1)
        time.sleep(0.05)
    handle = session.pipe.unet.register_forward_pre_hook(slow)
    try:
        a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
        s = SETTINGS
        long = a.submit("a red circle", "", 90, s["guidance"], 0, False, s["width"], s["height"], "model default",
                        1, False, api_name="/generate")
        _wait(lambda: len(steps) >= 2)
        short = b.submit("a red circle", "", 2, s["guidance"], 0, False, s["width"], s["height"], "model default",
                         1, False, api_name="/generate")
        b.predict(api_name="/interrupt")  # someone else's Interrupt stops nothing of a's
        _wait(lambda: len(steps) >= 6)  # a's generation goes on stepping (on a loaded machine, slowly)
        assert not long.done()
        a.predict(api_name="/interrupt")
        with pytest.raises(AppError, match=r"interrupted at step \d+ of 90"):
            long.result(timeout=30)
        images, _, _ = short.result(timeout=30)
        assert images[0]["image"]
    finally:
        handle.remove()


def _wait(condition, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
