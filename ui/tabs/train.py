"""Train tab: pick a dataset (its check, bucket statistics and captions, editable), set up a run from the
trainer's own config, start it as an `imglora train` process, and watch it (progress, time left, loss
curves, sample grids); stop and resume. A finished run's adapter joins the adapters list.

The settings form is built from TrainConfig's fields (their help, choices and defaults; HELP_GROUPS sorts
them), so a new trainer option appears here by itself. The fields the app decides (APP_FIELDS) are not in
the form. The form's one exchange format is the TOML `imglora train --config` reads: Start turns the form
into it, the API takes it, and it can be saved and loaded. Runs live in the server (ui/jobs.py); the page
polls them with a timer, so a reloaded or second tab shows the same runs.
"""

from __future__ import annotations

import math
import tempfile
import tomllib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from imglora.config import FIELDS, HELP_GROUPS, TrainConfig, _base_type, config_values, help_text, to_toml
from imglora.errors import ImgloraError, escaped
from imglora.pipeline import adapter_name
from imglora.synthetic.demo import RECIPE, WORD

from ..datasets import Datasets, autocaption, autocaption_module, captioner_names
from ..jobs import Jobs, _duration
from ..messages import in_page
from ..session import Session

# Decided by the app, never typed: paths stay inside --datasets and --outputs, and the adapter fits the model
# the app serves. A new path-valued TrainConfig field belongs here too.
APP_FIELDS = {
    "data": "the dataset picked above", "reg_data": "the regularisation dataset picked above",
    "output": "OUTPUTS/runs/RUN", "name": "the run name", "model": "the model this app serves",
    "model_config": "the model this app serves", "resume": "the Resume button",
    "overwrite": "a run never replaces files", "cache_dir": "inside the run folder",
    "sample_prompts_file": "type the prompts in 'sample prompts'", "mask_dir": "a folder path (not offered here)",
}
FORM = [n for names in HELP_GROUPS.values() for n in names if n not in APP_FIELDS and n in FIELDS]
OPEN_GROUPS = ("adapter", "optimisation", "sampling")  # what most runs change; the rest starts folded
CURVE_COLOURS = {"loss": "#a9c4e8", "loss (average)": "#1f5fbf", "validation loss": "#e8590c"}
# The demo: `imglora demo`'s recipe on its datasets, with held-out images for a validation curve.
DEMO_SETTINGS = {**RECIPE, "sample_every": 100, "val_count": 4, "val_every": 50,
                 "sample_prompts": [f"a red {WORD} on a white background", "a blue circle on a white background"]}


@dataclass
class Training:
    """What the tab works on: the datasets folder, the runs, and the captioner models' folder."""
    datasets: Datasets
    jobs: Jobs
    captioners: Path | None = None

    @classmethod
    def open(cls, session: Session, datasets_dir, captioners_dir=None, model=None, model_config=None) -> "Training":
        """Runs go to OUTPUTS/runs and train the model the app serves (model, model_config: as given to the app)."""
        fixed = {"model": str(Path(model).resolve()) if model else None,
                 "model_config": str(Path(model_config).resolve()) if model_config else None}
        jobs = Jobs(session.outputs, session.catalogue.folder, fixed, on_publish=session.catalogue.scan)
        captioners = Path(captioners_dir).expanduser().resolve() if captioners_dir else None
        return cls(Datasets(datasets_dir), jobs, captioners)

    def private_paths(self) -> list[str]:
        """Never served (thumbnails are copies in Gradio's cache): the datasets and the captioner models."""
        return [str(p) for p in (self.datasets.root, self.captioners) if p is not None]


# -- settings: the form <-> field values <-> TOML --------------------------------------------------
def _form_value(name: str, value):
    """A form component's value as the field's type (empty: None, the default)."""
    kind = _base_type(name)
    if kind is list:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()] or None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if kind is int:
        number = float(value)
        if not number.is_integer():
            raise ImgloraError(f"{name.replace('_', ' ')} must be a whole number, got {value}")
        return int(number)
    return float(value) if kind is float else value.strip() if isinstance(value, str) else value


def settings_of(*values) -> dict:
    """The form's values (in FORM order) that differ from the defaults, checked as a TOML's keys would be."""
    out = {}
    for name, value in zip(FORM, values):
        value = _form_value(name, value)
        if value is not None and value != FIELDS[name].default:
            out[name] = value
    return checked(out)


def checked(settings: dict) -> dict:
    """Types and choices (config_values), then the trainer's own cross-field checks."""
    values = config_values(settings)
    # The datasets are the app's to choose (a stand-in here); the real ones are checked when a run starts.
    TrainConfig(**{**values, "data": ".", "reg_data": "."}).check()
    return values


def read_settings(text: str, strict: bool = True) -> tuple[dict, list[str]]:
    """(settings, keys left out) of a TOML text. strict: a key the app decides is an error, else left out."""
    try:
        raw = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as e:
        raise ImgloraError(f"invalid TOML ({e})", "fix the syntax") from None
    locked = [k for k in raw if k.replace("-", "_") in APP_FIELDS]
    if locked and strict:
        raise ImgloraError(f"{', '.join(locked)} cannot be set here: the app decides "
                           f"{'; '.join(APP_FIELDS[k.replace('-', '_')] for k in locked)}", "leave them out")
    return checked({k: v for k, v in raw.items() if k not in locked}), locked


def form_values(settings: dict) -> list:
    """Values for the FORM components: the settings, else each field's default."""
    out = []
    for name in FORM:
        value = settings.get(name, FIELDS[name].default)
        if _base_type(name) is list:
            value = "\n".join(value or [])
        elif value is None and (FIELDS[name].metadata.get("choices") or _base_type(name) is str):
            value = ""
        out.append(value)
    return out


def read_toml_file(path) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, TypeError):
        raise ImgloraError("not a UTF-8 text file", "save the TOML as UTF-8 text") from None


def form_to_toml(*values) -> str:
    return to_toml(settings_of(*values))


def toml_to_form(text: str) -> tuple[list, str]:
    """(the FORM values of a TOML, a note naming the keys left out because the app decides them)."""
    settings, left_out = read_settings(text, strict=False)
    note = f"loaded; left out (the app decides them): {', '.join(map(escaped, left_out))}" if left_out else "loaded"
    return form_values(settings), note


def _component(name: str):
    f = FIELDS[name]
    kind, choices = _base_type(name), f.metadata.get("choices")
    common = {"label": name.replace("_", " "), "info": help_text(f).replace("%%", "%"), "elem_id": f"cfg-{name}",
              "min_width": 240}
    if kind is bool:
        return gr.Checkbox(value=f.default, **common)
    if choices:
        return gr.Dropdown(([""] if f.default is None else []) + list(choices), value=f.default or "", **common)
    if kind is list:
        return gr.Textbox(lines=2, max_lines=8, placeholder="one per line", **common)
    if kind in (int, float):
        return gr.Number(value=f.default, precision=0 if kind is int else None, **common)
    return gr.Textbox(value=f.default or "", **common)


# -- datasets --------------------------------------------------------------------------------------
def dataset_view(tr: Training, resolution: int, name):
    """(check findings, bucket stats, thumbnails, their image names, a line about the grid)."""
    if not name:
        return "", "", [], [], "Choose a dataset, or make the demo dataset."
    findings, stats = tr.datasets.report(name, resolution)
    items, rels, total = tr.datasets.thumbnails(name)
    shown = f"{total} images" + (f" (the first {len(items)} are shown)" if len(items) < total else "")
    return findings, stats, items, rels, shown + ". Click an image to edit its caption."


def pick_image(rels, captions, evt: gr.SelectData):
    if evt is None or not isinstance(evt.index, int) or not 0 <= evt.index < len(rels or []):
        return gr.skip(), gr.skip()
    return rels[evt.index], captions[evt.index] if captions else ""


def save_caption(tr: Training, name, rel, text) -> str:
    return tr.datasets.save_caption(name, rel, text)


def make_demo(tr: Training):
    made = tr.datasets.make_demo()
    note = f"made {', '.join(made)}" if made else "the demo datasets are already there"
    return (f"{note}: 60 hearts captioned '{WORD}' to learn, and 60 known shapes for prior preservation. The demo "
            "recipe is in the settings; press Start.", to_toml(checked(DEMO_SETTINGS)))


def free_run_name(tr: Training, dataset) -> str:
    return adapter_name(dataset or "run", list(tr.jobs.runs) + [p.name for p in tr.jobs.root.glob("*")])


# -- runs ------------------------------------------------------------------------------------------
def start_run(tr: Training, dataset, reg_dataset, name, settings_toml: str) -> tuple[str, str]:
    """Queue a run of `dataset` (and `reg_dataset` for prior preservation) with the TOML settings."""
    settings, _ = read_settings(settings_toml, strict=True)
    data = tr.datasets.path(dataset)
    reg = str(tr.datasets.path(reg_dataset)) if reg_dataset else None
    run = tr.jobs.submit(name, TrainConfig(**{**settings, "data": str(data), "reg_data": reg}))
    # What the button did, not a live status (that is under Runs): it would read stale once the run moves on.
    return f"queued {run.name} ({run.message}); its progress is under Runs", run.name


def stop_run(tr: Training, name) -> str:
    return tr.jobs.stop(name)


def resume_run(tr: Training, name) -> str:
    run = tr.jobs.resume(name)
    return f"queued {run.name} to resume ({run.message}); its progress is under Runs"


def run_settings(tr: Training, name) -> str:
    """The settings a run was started with, as TOML (without what the app decided)."""
    settings = {k: v for k, v in tr.jobs.get(name).settings.items() if k not in APP_FIELDS}
    return to_toml(settings)


def status_text(run) -> str:
    if run is None:
        return "No runs yet: choose a dataset and press Start."
    p = run.progress()
    line = f"{run.name}: {run.state}, step {p.step}/{p.total or '?'}"
    if p.total:
        line += f" ({100 * p.step // p.total}%)"
    if run.state == "running" and p.seconds_per_step:
        line += f", {1 / p.seconds_per_step:.1f} steps/s, about {_duration(p.eta)} left"
    if p.loss:
        line += f"; loss {p.loss[-1][1]:.4f}"
    if p.val_loss:
        line += f"; validation loss {p.val_loss[-1][1]:.4f} at step {p.val_loss[-1][0]}"
    return escaped(line) + (f"\n{escaped(run.message)}" if run.message else "")


def curves(run):
    """The loss, its running average and the validation loss, for the LinePlot (None: nothing yet)."""
    import pandas as pd

    rows = []
    p = run.progress() if run else None
    if p and p.loss:
        every = max(1, len(p.loss) // 1000)  # a plot of a long run stays light
        smooth = None
        for i, (step, loss) in enumerate(p.loss):
            smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss  # as the trainer's progress bar
            if i % every == 0 or i == len(p.loss) - 1:
                rows += [(step, loss, "loss"), (step, smooth, "loss (average)")]
        rows += [(step, v, "validation loss") for step, v in p.val_loss]
    if not rows:
        return None  # not an empty frame: a plot that once drew one draws no lines afterwards (gradio 6.31)
    # Every series from the first frame on (a point of no value until it has one): the plot draws only the
    # series its first frame had (gradio 6.31), and the validation loss comes later.
    rows += [(rows[0][0], math.nan, name) for name in CURVE_COLOURS if name not in {r[2] for r in rows}]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def run_view(tr: Training, session: Session, name):
    """Everything the Runs panel shows about the run `name` (default: the current one)."""
    jobs = tr.jobs
    run = jobs.get(name) if name else jobs.current()
    runs = list(jobs.runs.values())[::-1]  # a copy, newest first: a run may be added meanwhile
    samples, tail = [], ""
    if run is not None:
        p = run.progress()
        samples = [(session.shown(s), f"step {s.stem[5:].lstrip('0') or '0'}") for s in reversed(p.samples[-8:])]
        tail = "\n".join(escaped(line) for line in p.tail)
    return (gr.update(choices=[r.name for r in runs], value=run.name if run else None), status_text(run),
            [r.row() for r in runs], curves(run), samples, tail, jobs.published)


def poll(tr: Training, session: Session, name, seen):
    """run_view, or nothing when nothing changed since this tab last looked (no redraw, no flicker)."""
    jobs = tr.jobs
    run = (jobs.runs.get(name) if name else None) or jobs.current()
    p = run.progress() if run else None
    key = (tuple(tuple(r.row()) for r in list(jobs.runs.values())), run and (run.name, run.state, run.message),
           p and (p.step, len(p.val_loss), len(p.samples), tuple(p.tail)), jobs.published)
    if key == seen:
        return (*[gr.skip()] * 7, seen)
    return (*run_view(tr, session, run.name if run else None), key)


# -- the tab ---------------------------------------------------------------------------------------
def create_ui(session: Session, tr: Training, catalogue_changed: dict, demo: gr.Blocks):
    resolution = session.model.resolution
    names = tr.datasets.names()
    gr.Markdown("Datasets are the folders in the app's datasets folder (`--datasets`). Runs are written to "
                "`runs/` in its outputs folder, and their adapters join the adapters list when they finish.")
    with gr.Row(equal_height=True):
        # allow_custom_value: the choices change after the page is built (a new folder, a new run), and every
        # name is looked up on the server anyway (datasets.py, jobs.py), never used as a path.
        dataset = gr.Dropdown(names, value=names[0] if names else None, label="Dataset", elem_id="train-dataset",
                              scale=3, allow_custom_value=True)
        relist = gr.Button("Refresh", size="sm", scale=0, min_width=90, elem_id="train-relist")
        demo_button = gr.Button("Make the demo dataset", size="sm", scale=1, elem_id="train-demo")
    note = gr.Textbox(show_label=False, interactive=False, container=False, elem_id="train-note")
    with gr.Tabs() as sections:
        with gr.Tab("Dataset", id="dataset"):
            shown = gr.Markdown("", elem_id="train-shown")
            thumbs = gr.Gallery(label="Images and captions", columns=6, height=320, format="png", object_fit="contain",
                                elem_id="train-thumbs", allow_preview=False)
            rels = gr.State([])
            with gr.Row():
                image = gr.Textbox(label="Image", interactive=False, scale=1, elem_id="train-image")
                caption = gr.Textbox(label="Caption", scale=4, elem_id="train-caption")
                save = gr.Button("Save caption", scale=0, min_width=120, elem_id="train-save-caption")
            with gr.Row():
                findings = gr.Textbox(label="Dataset check", lines=4, max_lines=16, interactive=False,
                                      elem_id="train-findings")
                stats = gr.Textbox(label=f"Buckets at {resolution} px", lines=4, max_lines=16, interactive=False,
                                   elem_id="train-stats")
            captioned, captioner = _autocaption_ui(tr, dataset, note)
        with gr.Tab("Settings", id="settings"):
            with gr.Row(equal_height=True):
                run_name = gr.Textbox(free_run_name(tr, names[0] if names else None), label="Run name",
                                      elem_id="train-run-name", info="letters, digits, _ and -: the adapter's name")
                reg = gr.Dropdown([""] + names, value="", label="Regularisation dataset (prior preservation)",
                                  elem_id="train-reg", allow_custom_value=True)
                start = gr.Button("Start", variant="primary", scale=0, min_width=120, elem_id="train-start")
            fields = []
            for title, group in HELP_GROUPS.items():
                here = [n for n in group if n in FORM]
                if not here:
                    continue
                with gr.Accordion(title, open=title in OPEN_GROUPS, elem_id=f"cfg-group-{title.replace(' ', '-')}"):
                    with gr.Row():
                        for n in here:
                            fields.append(_component(n))
            with gr.Accordion("As TOML (what `imglora train --config` reads)", open=False, elem_id="train-toml-box"):
                toml = gr.Textbox(show_label=False, lines=6, max_lines=30, elem_id="train-toml")
                with gr.Row():
                    to_text = gr.Button("Form to TOML", size="sm", elem_id="train-form-to-toml")
                    to_form = gr.Button("TOML to form", size="sm", elem_id="train-toml-to-form")
                    save_file = gr.Button("Save as a file", size="sm", elem_id="train-save-toml")
                    from_run = gr.Button("Settings of the selected run", size="sm", elem_id="train-from-run")
                toml_file = gr.File(label="TOML file: drop one here to load it", file_types=[".toml"], type="filepath",
                                    height=90, elem_id="train-toml-file", visible=session.uploads_enabled)
        with gr.Tab("Runs", id="runs"):
            with gr.Row():
                run = gr.Dropdown(list(reversed(tr.jobs.runs)), label="Run", elem_id="train-run", scale=3,
                                  allow_custom_value=True)
                stop = gr.Button("Stop", variant="stop", scale=0, min_width=100, elem_id="train-stop")
                resume = gr.Button("Resume", scale=0, min_width=100, elem_id="train-resume")
            status = gr.Textbox(show_label=False, interactive=False, lines=2, elem_id="train-status")
            # The colours are fixed and named in the label: the plot's own legend is lost when it is drawn while
            # its tab is hidden (gradio 6.31).
            plot = gr.LinePlot(x="step", y="value", color="series", height=240, elem_id="train-plot", x_title="step",
                               y_title="loss", color_map=CURVE_COLOURS,
                               label="Loss: each step (light blue), its running average (blue), validation (orange)")
            samples = gr.Gallery(label="Sample grids (newest first: base | adapter)", columns=2, height=300,
                                 format="png", object_fit="contain", elem_id="train-samples")
            with gr.Accordion("Output of the process", open=False):
                tail = gr.Textbox(show_label=False, lines=6, max_lines=12, interactive=False, elem_id="train-tail")
            table = gr.Dataframe(headers=["run", "state", "step", "time left", "adapter"], interactive=False,
                                 elem_id="train-runs", wrap=True)
    published = gr.State(tr.jobs.published)
    seen = gr.State(None)
    captions = gr.State([])  # the grid's captions, in its order, for the editor

    def grid(name):
        f, s, items, names_, line = dataset_view(tr, resolution, name)
        return f, s, items, names_, [c for _, c in items], line

    def view(name):  # another dataset: the caption editor is emptied too
        return *grid(name), "", ""
    view_outputs = [findings, stats, thumbs, rels, captions, shown, image, caption]
    dataset.change(in_page(view), dataset, view_outputs, api_name="dataset")
    dataset.change(lambda d: free_run_name(tr, d), dataset, run_name, api_visibility="private")

    def relisted(current=None):
        choices = tr.datasets.names()
        value = current if current in choices else (choices[0] if choices else None)
        models = [gr.update(choices=captioner_names(tr.captioners))] if captioner is not None else []
        return gr.update(choices=choices, value=value), gr.update(choices=[""] + choices), *models
    listed = [dataset, reg] + ([captioner] if captioner is not None else [])
    relist.click(relisted, dataset, listed, api_name="datasets")
    # A reloaded page lists the folder again and shows the dataset (the runs come with the timer's first tick).
    demo.load(relisted, dataset, listed, api_visibility="private").then(
        in_page(view), dataset, view_outputs, api_visibility="private")
    thumbs.select(pick_image, [rels, captions], [image, caption], api_visibility="private")
    save.click(in_page(partial(save_caption, tr)), [dataset, image, caption], note, api_name="save_caption").success(
        in_page(grid), dataset, view_outputs[:6], api_visibility="private")
    if captioned is not None:
        captioned.success(in_page(view), dataset, view_outputs, api_visibility="private")

    def demo_made():
        message, text = make_demo(tr)
        choices = tr.datasets.names()
        return (message, gr.update(choices=choices, value="demo-zorbly"), gr.update(choices=[""] + choices,
                value="demo-shapes"), text, *toml_to_form(text)[0])
    demo_button.click(in_page(demo_made), None, [note, dataset, reg, toml, *fields], api_name="make_demo_dataset")

    def to_form_values(text):
        values, loaded = toml_to_form(text)
        return *values, loaded
    to_text.click(in_page(form_to_toml), fields, toml, api_name="settings_toml")
    to_form.click(in_page(to_form_values), toml, [*fields, note], api_visibility="private")
    toml_file.upload(in_page(read_toml_file), toml_file, toml,
                     api_visibility="private").success(in_page(to_form_values), toml, [*fields, note],
                                                       api_visibility="private")

    def file_of(*values):
        with tempfile.TemporaryDirectory(prefix="imglora-settings-") as folder:
            (Path(folder) / "run.toml").write_text(form_to_toml(*values), encoding="utf-8")
            return session.shown(Path(folder) / "run.toml")  # a copy in Gradio's cache, served from there
    save_file.click(in_page(file_of), fields, toml_file, api_visibility="private")
    from_run.click(in_page(partial(run_settings, tr)), run, toml, api_visibility="private").success(
        in_page(to_form_values), toml, [*fields, note], api_visibility="private")

    # Start: the form as TOML (the one exchange format), then the run; /start_run takes the TOML directly.
    api_start = gr.Button(visible=False)
    api_start.click(in_page(partial(start_run, tr)), [dataset, reg, run_name, toml], [note, run], api_name="start_run")
    start.click(in_page(form_to_toml), fields, toml, api_visibility="private").success(
        in_page(partial(start_run, tr)), [dataset, reg, run_name, toml], [note, run], api_visibility="private").success(
        lambda: gr.Tabs(selected="runs"), None, sections, api_visibility="private")
    stop.click(in_page(partial(stop_run, tr)), run, note, api_name="stop_run")
    resume.click(in_page(partial(resume_run, tr)), run, note, api_name="resume_run")

    view_out = [run, status, table, plot, samples, tail, published]
    run.input(in_page(partial(run_view, tr, session)), run, view_out, api_name="run_status")
    timer = gr.Timer(1.0)
    timer.tick(in_page(partial(poll, tr, session)), [run, seen], [*view_out, seen], api_visibility="private",
               show_progress="hidden", concurrency_limit=None)
    published.change(**catalogue_changed)
    return {"dataset": dataset, "run": run}


def _autocaption_ui(tr: Training, dataset, note):
    """The captioner picker and button: (the click event, to chain the grid's refresh; the picker), or
    (None, None) and a note where datasets_tools/autocaption.py is not installed."""
    if autocaption_module() is None:
        gr.Markdown("Auto-captioning appears here once `datasets_tools/autocaption.py` is installed.",
                    elem_id="train-autocaption-missing")
        return None, None
    with gr.Row():
        names = captioner_names(tr.captioners)
        captioner = gr.Dropdown(names, value=names[0] if names else None, elem_id="train-captioner", scale=2,
                                allow_custom_value=True,
                                label="Captioner (a model folder in the app's --captioners folder)")
        existing = gr.Radio(["skip", "overwrite", "append"], value="skip", elem_id="train-existing", scale=2,
                            label="Images with a caption (replaced ones are backed up)")
        go = gr.Button("Caption the dataset", elem_id="train-autocaption", scale=0, min_width=160)
    event = go.click(in_page(lambda name, model, mode: autocaption(tr.datasets, name, tr.captioners, model, mode)),
                     [dataset, captioner, existing], note, api_name="autocaption")
    return event, captioner
