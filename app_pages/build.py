"""Build: a feature cache of one model layer over a dataset, computed in the background."""

import re
import shutil
from dataclasses import replace
from pathlib import Path

import streamlit as st

from ui.base import as_written, loading, settings

st.title("Build a feature cache")
s = settings()
if not s.allow_build:
    st.info(
        "Building is switched off on this server (VFS_HOSTED or VFS_ALLOW_BUILD=0); "
        "it serves the caches listed on the Home page."
    )
    st.stop()
with loading():  # the title is on screen while a fresh server loads PyTorch
    from ui.core import (
        CACHE,
        DEMO_JOB,
        bind,
        build_registry,
        cache_rows,
        dataset_columns,
        get_cache,
        layers,
        user_errors,
    )
    from ui.views import build_panel, cache_table, held_elsewhere, megabytes, skipped_images, start_build
    from vfs.background import resume_job
    from vfs.cache import BuildLock
    from vfs.data import EMBEDDED_DATASET
    from vfs.devices import device_choices
    from vfs.jobs import BuildJob
    from vfs.models import EMBEDDED_MODELS, input_shape_note

OTHER_MODEL = "Another model (type its spec)"
NONE = "(none)"
EMBEDDED, FOLDER, MANIFEST, TORCHVISION = (
    "Embedded demo (scikit-image)",
    "Image folder",
    "Manifest (CSV / Parquet)",
    "torchvision dataset",
)
DEMO = BuildJob.from_toml(DEMO_JOB)  # the page starts from the demo's settings (not its `out`)


def default_name(source: str, spec: str, layer: str) -> str:
    """E.g. "skimage-efficientnet_lite0-blocks.5": the dataset, the model and the layer."""
    data = Path(source.partition("?")[0].rpartition(":")[2].rstrip("/"))
    dataset = data.parent.name if data.suffix in (".csv", ".parquet") else data.stem
    model = Path(spec.partition("?")[0].rpartition(":")[2].partition("@")[0]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}-{model}-{layer}").strip("._-")


registry = build_registry()

st.header("Model and layer")
choice = st.selectbox("Model", [*EMBEDDED_MODELS, OTHER_MODEL], key=bind("build.model", DEMO.model))
spec = (
    choice
    if choice != OTHER_MODEL
    else st.text_input(
        "Model spec",
        key=bind("build.spec", ""),
        placeholder="timm:resnet50 · torchvision:resnet50@IMAGENET1K_V2 · file:edited.pt?arch=resnet50",
        help="timm:<name>[?pretrained=false], torchvision:<name>[@<weights>|@none], "
        "file:<checkpoint>?arch=<name>, "
        "python:<module>:<function>. Weights other than the embedded ones are downloaded on first use.",
    )
)
if not spec.strip():
    st.info("Type a model spec, e.g. timm:resnet50.")
    st.stop()
size = st.number_input(
    "Input size (px)",
    32,
    1024,
    value=None,  # cleared, it is None again (its default), not the minimum
    step=16,
    key=bind("build.size", None),
    placeholder="the model's own",
    help="Larger inputs give finer feature grids.",
)
with user_errors():
    s.check_model_spec(spec)
    found = {info.name: info for info in layers(spec.strip(), size)}
if not found:
    st.error(f"{as_written(spec)} has no layer with a spatial output at {size or 'its own'} px input.")
    st.stop()
note = input_shape_note(spec.strip())
if note:
    st.info(note)
fallback = (
    DEMO.layer if DEMO.layer in found else next((n for n in reversed(found) if "." not in n), list(found)[-1])
)
layer = st.selectbox(
    f"Layer ({len(found)} with a spatial output)",
    list(found),
    key=bind("build.layer", fallback, options=found),
    format_func=lambda n: (
        f"{n} — {found[n].height}×{found[n].width} grid, {found[n].channels} channels"
        + (f" {found[n].note}" if found[n].note else "")
    ),
)

st.header("Dataset")
kind = st.radio(
    "Dataset source",
    [EMBEDDED, FOLDER, MANIFEST, TORCHVISION],
    horizontal=True,
    key=bind("build.source", EMBEDDED),
)
if kind == EMBEDDED:
    source = EMBEDDED_DATASET
elif kind == FOLDER:
    source = st.text_input(
        "Image folder",
        key=bind("build.folder", ""),
        placeholder="/data/photos",
        help="All images below it; the first level of sub-folders gives the labels.",
    )
elif kind == MANIFEST:
    source = st.text_input(
        "Manifest file",
        key=bind("build.manifest", ""),
        placeholder="../shared/data/nih_cxr_kcr64/manifest.csv",
        help="A .csv or .parquet file: a `path` column relative to the file, then labels.",
    )
else:
    source = st.text_input(
        "torchvision dataset",
        key=bind("build.torchvision", "torchvision:CIFAR10?split=test"),
        help="torchvision:<Dataset>[?split=…&root=…]; downloaded on the first build (needs internet).",
    )
source = source.strip()
if not source:
    st.info("Give the dataset's location.")
    st.stop()
label_default: str | None
count: int | None
if kind == TORCHVISION:  # opening it would download it: torchvision datasets have one `label` column
    columns, count, label_default, domain_default = ["label"], None, "label", None
else:
    with user_errors():
        columns, count, label_default, domain_default = dataset_columns(source)
    st.caption(f"{count} images; columns: {as_written(', '.join(columns)) or 'none besides path'}")
options = [NONE, *columns]
left, right = st.columns(2)
label = left.selectbox(
    "Label column", options, key=bind("build.label", label_default or NONE, options=options, context=source)
)
domain = right.selectbox(
    "Domain column",
    options,
    key=bind("build.domain", domain_default or NONE, options=options, context=source),
    help="e.g. the source, site or style of each image: search can keep at most n per domain.",
)
limit = st.number_input(
    "Use only the first N images",
    1,
    None,
    value=None,  # cleared, it is None again (its default), not the minimum
    key=bind("build.limit", None),
    placeholder=f"all {count}" if count else "all",
)

st.header("Output")
suggested = default_name(source, spec, layer)
name = st.text_input("Cache name", key=bind("build.name", ""), placeholder=suggested).strip() or suggested
with user_errors():
    out = s.cache_path(name)
HERE, cluster = "This machine", f"The Ray cluster at {s.ray_address}"
through_client = (s.ray_address or "").startswith("ray://")  # Ray Client: searches, not builds
where = (
    st.radio(
        "Run on",
        [HERE, cluster],
        key=bind("build.where", HERE, options=(HERE, cluster)),
        horizontal=True,
        help="VFS_RAY_ADDRESS names a Ray cluster: images are decoded and the model runs on "
        "its nodes, which must read the dataset at the same path (docs/cluster.md).",
    )
    if s.ray_address and not through_client
    else HERE
)
if through_client:
    st.caption(
        f"Builds run on this machine: {s.ray_address} is a Ray Client address, through which searches run "
        "but not builds (Ray Data's pipeline needs its driver on the cluster: run the app on one of its "
        "nodes with VFS_RAY_ADDRESS=auto to build there; docs/cluster.md)."
    )
on_cluster = where == cluster
with st.expander("Performance: device, batch size, workers"):
    devices = ["auto", "cpu", "cuda"] if on_cluster else device_choices()  # a cluster's GPUs are its nodes'
    device = st.selectbox(
        "Device",
        devices,
        key=bind("build.device", DEMO.device, options=devices),
        help="auto: a GPU where there is one (cuda, then mps), else the CPU.",
    )
    batch_size = st.number_input(
        "Batch size",
        1,
        4096,
        key=bind("build.batch_size", DEMO.batch_size),
        help="Images per forward pass: larger batches keep a GPU busier, up to its memory.",
    )
    workers = st.number_input(
        "Extractor actors" if on_cluster else "Decoding workers",
        0,
        None,
        key=bind("build.workers", DEMO.workers),
        help="0: one per GPU of the cluster, or one."
        if on_cluster
        else "Processes that decode and resize images while the model runs (0: the build's own). "
        "Decoding is what limits a build on a GPU: give it about as many as the machine has cores.",
    )


def performing(started: BuildJob) -> BuildJob:
    """A partial cache's job resumed on the device and with the workers chosen under Performance:
    the ones it was started with may be another machine's (a GPU box's `cuda` failed here), and
    neither decides which images are stored. Its batch size stays (batches bounded as the
    uninterrupted build's were)."""
    return replace(started, device=device, workers=int(workers))


job = BuildJob(
    layer=layer,
    data=source,
    out=str(out),
    model=spec.strip(),
    label_col="" if label == NONE else label,  # none, as shown: None would take `label` where there is one
    domain_col="" if domain == NONE else domain,
    image_size=size,
    limit=limit,
    batch_size=int(batch_size),
    device=device,
    workers=int(workers),
    engine="ray" if on_cluster else "local",
    address=s.ray_address if on_cluster else None,
)
rows = cache_rows()
existing = next((r for r in rows if Path(r["path"]) == out), None)
current = registry.get(out)
if current is not None and current.status().running:
    st.info(f"{name} is being built: its progress is below.")
elif existing is not None and existing["complete"]:
    st.warning(
        f"A complete cache called {name} exists in {s.cache_dir}/: choose another name, or delete it below."
    )
elif existing is not None and (held := held_elsewhere(out)) is not None:  # the CLI's build, say
    st.info(f"A partial cache called {name} is being built by another process: {held}.")
elif existing is not None:  # a partial cache goes on as it was started, whatever is chosen above
    with user_errors():
        started = resume_job(get_cache(str(out)), moved_to=job.data)
    unset = {"image_size": "the model's own", "limit": "all images"}  # what None means, as the form says

    def setting(value: object, field: str) -> str:
        return unset.get(field, "none") if value is None else str(value)

    differ = [
        f"{what} {setting(getattr(started, field), field)}, not {setting(getattr(job, field), field)}"
        for field, what in (
            ("model", "model"),
            ("layer", "layer"),
            ("image_size", "image size"),
            ("data", "dataset"),
            ("limit", "limit"),
            ("batch_size", "batch size"),
        )
        if getattr(started, field) != getattr(job, field)
    ]
    st.info(
        f"A partial cache called {name} exists ({existing.get('stored', 0)} images stored): Resume build "
        f"continues it with the settings it was started with"
        + (f" ({'; '.join(differ)}). For the settings above, choose another name." if differ else ".")
        + " Device and workers are the ones chosen under Performance."
    )
    st.button(
        "Resume build", type="primary", key="build.start", on_click=start_build, args=(performing(started),)
    )
else:
    st.button("Build cache", type="primary", key="build.start", on_click=start_build, args=(job,))
    st.caption(f"Writes {out}. A cancelled or interrupted build resumes where it stopped.")

st.header("Builds")
build_panel()

st.header("Caches")
if not rows:
    st.info(f"No caches in {s.cache_dir}/ yet.")
    st.stop()
cache_table(rows)
local = {r["name"]: r for r in rows if Path(r["path"]).parent == s.cache_dir}
if not local:
    st.stop()
target = st.selectbox(
    "Manage a cache", list(local), key=bind("build.manage", next(iter(local)), options=local)
)
path = s.cache_path(target)
building = (b := registry.get(path)) is not None and b.status().running or held_elsewhere(path) is not None
if not local[target]["error"]:
    with user_errors():
        skipped_images(get_cache(str(path)), "build.manage.skipped")
actions = st.container(horizontal=True)
if not local[target]["complete"] and not local[target]["error"] and not building:
    actions.button(
        "Resume build",
        key="build.resume",
        on_click=lambda: start_build(performing(resume_job(get_cache(str(path))))),
    )
if actions.button("Delete…", key="build.delete", disabled=building):
    st.session_state["build.confirm"] = target
if st.session_state.get("build.confirm") == target:
    held = megabytes(local[target].get("size_bytes"))
    st.warning(f"Delete the cache {target} ({held or 'size unknown'}, {path})? This cannot be undone.")
    yes, no = st.columns(2)
    if yes.button("Yes, delete it", type="primary", key="build.delete_yes"):
        with user_errors():
            with BuildLock(path):  # refused while any build (this server's or the CLI's) writes it
                shutil.rmtree(path)
        registry.forget(path)
        st.session_state.pop("build.confirm")
        if st.session_state.get(CACHE) == str(path):
            del st.session_state[CACHE]
        st.rerun()
    if no.button("Keep it", key="build.delete_no"):
        st.session_state.pop("build.confirm")
        st.rerun()
