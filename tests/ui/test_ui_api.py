"""The running app through its HTTP API (gradio_client and raw requests), as another program would use it."""

import threading

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from ui_helpers import SETTINGS, http_status, in_folder, same_image

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
