"""`cxrfast export`: a run bundle → ONNX model + the preprocessing recipe, and `OnnxRunner` to use them.

The export is a folder holding `model.onnx` (normalised image [batch, n_in, size, size] → logits [batch, K])
and `preprocessing.json` (how a file becomes that input, the class names and the calibration temperature), so
that another program, in any language with an ONNX runtime, can reproduce `cxrfast predict` exactly.

`OnnxRunner` runs the export with ONNX Runtime on the CPU and does not import torch: `cxrfast predict --runtime
onnx` starts in about a second instead of the several seconds that importing torch (and fastai) takes.

Why the TorchScript-based exporter (`dynamo=False`): torch's newer exporter needs the `onnxscript` package,
one more dependency for no gain on these plain convolutional networks; the TorchScript exporter needs only
`onnx`. The export is checked against PyTorch on a random batch before it is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr_fast.config import contract_problem
from cxr_fast.data.dedup import file_sha256
from cxr_fast.errors import CxrFastError, first_line, read_json, storage_problem

ONNX_FILE = "model.onnx"
PREPROCESSING_FILE = "preprocessing.json"
OPSET = 17  # supported by every onnxruntime since 1.11 (2022) and by the TorchScript exporter
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXPORT_TOLERANCE = 1e-4  # largest logit difference from PyTorch accepted for a fresh export
FORMAT = "cxr_fast-onnx/1"
SPEC_KEYS = ("run", "arch", "classes", "temperature", "size", "n_in", "mean", "std")  # what OnnxRunner reads


def preprocessing_spec(run) -> dict:
    """Everything besides the network that turns a file into probabilities, as plain JSON."""
    config = run.config
    return {
        "format": FORMAT,
        "run": run.name,
        "arch": config["model"]["arch"],
        "classes": run.classes,
        "temperature": run.temperature,
        "size": run.size,
        "n_in": run.n_in,
        "mean": [float(m) for m in config["mean"]],
        "std": [float(s) for s in config["std"]],
        "read": ("8-bit grayscale: PNG/JPEG converted to luma, EXIF rotation applied; DICOM through its modality "
                 "LUT and first VOI window, MONOCHROME1 inverted (cxr_fast.data.io.read_image)"),
        "resize": "squish bilinear",  # to size x size, aspect not kept (cxr_fast.preprocess.resize_square)
        "scale": "pixel / 255, the gray image repeated n_in times, then (x - mean[c]) / std[c] per channel",
        "input": {"name": INPUT_NAME, "shape": ["batch", run.n_in, run.size, run.size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(run.classes)], "meaning": "logits"},
        "probabilities": "softmax(logits / temperature)",
    }


def export_onnx(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False,
                opset: int = OPSET, progress: bool = True) -> Path:
    """Write `model.onnx` and `preprocessing.json` into `out` (default: the run folder); return the .onnx path.

    An existing export is refused unless `force`. The exported model must reproduce PyTorch's logits on a random
    batch to `EXPORT_TOLERANCE`, else nothing is kept. `progress`: a bar over the export and its check (10-60 s
    for a frozen_lite run on 2 cores, silent before).
    """
    import importlib.util
    import warnings

    import torch

    from cxr_fast.bundle import load_run
    from cxr_fast.outputs import check_folder_path, partial_path, write_text, writing
    from cxr_fast.progress import progress_bar

    run = load_run(run_dir)
    folder = Path(out) if out is not None else run.path
    with writing(folder):  # a second export into this folder refuses: the two shared .model.onnx.partial
        onnx_path, spec_path = folder / ONNX_FILE, folder / PREPROCESSING_FILE
        # preprocessing.json is written first, model.onnx renamed into place last: a preprocessing.json of ours alone is
        # an export stopped between the two, replaced without --force. Any other file of those names is protected.
        unfinished = spec_path.is_file() and not onnx_path.exists() and _is_our_spec(spec_path)
        existing = [p for p in (onnx_path, spec_path) if p.exists()]
        if existing and not unfinished and not force:
            raise CxrFastError(f"{existing[0]}: an export is already there; add --force to replace it")
        check_folder_path(folder, "--out")
        if out is not None and folder.is_dir() and folder.resolve() != run.path.resolve():
            # an export's folder is copied to another machine whole: another tool's files would travel with it
            others = sorted(p.name for p in folder.iterdir()  # a killed export's half files are not another tool's
                            if p.name not in (ONNX_FILE, PREPROCESSING_FILE) and not p.name.endswith(".partial"))
            if others:
                raise CxrFastError(f"{folder}: holds other files ({', '.join(others[:3])}{', …' if len(others) > 3 else ''}"
                                   "); --out needs a new or empty folder, or one holding an earlier export")
        for module, role in (("onnx", "writes the export"), ("onnxruntime", "checks it")):
            if importlib.util.find_spec(module) is None:
                raise CxrFastError(f"the {module} package ({role}) is not installed: pip install 'cxr_fast[onnx]'")
        folder.mkdir(parents=True, exist_ok=True)

        example = torch.randn(2, run.n_in, run.size, run.size, generator=torch.Generator().manual_seed(0))
        tmp_path, spec_tmp = partial_path(onnx_path), partial_path(spec_path)
        with progress_bar(progress) as bar:
            step = bar.add_task(f"exporting {run.name} to ONNX and checking it against PyTorch", total=2)
            try:
                with warnings.catch_warnings():
                    # Deprecation notice of the TorchScript exporter, and tracer notes about shapes that are fixed anyway
                    # (the input size is part of the model's contract).
                    warnings.simplefilter("ignore")
                    try:
                        torch.onnx.export(run.model, (example,), str(tmp_path), dynamo=False, opset_version=opset,
                                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
                    except Exception as e:  # noqa: BLE001 - the exporter raises many types for an operator it cannot map
                        if (storage := _storage_error(e)) is not None:  # a full disk is no fault of the exporter
                            storage.filename = storage.filename or str(onnx_path)  # the file the user asked for
                            raise storage from None
                        raise CxrFastError(f"{run.path}: torch.onnx cannot export {run.config['model'].get('arch')} at "
                                           f"opset {opset} ({first_line(e)})") from None
                bar.advance(step)
                with torch.no_grad():
                    expected = run.model(example).float().numpy()
                got = _session(tmp_path).run(None, {INPUT_NAME: example.numpy()})[0]
                difference = float(np.abs(got - expected).max())
                if not difference <= EXPORT_TOLERANCE:
                    raise CxrFastError(f"{run.path}: the ONNX export differs from PyTorch by {difference:.2e} in the logits "
                                       f"(more than {EXPORT_TOLERANCE:g}); not kept")
                bar.advance(step)
                spec = preprocessing_spec(run)
                spec.update({"opset": opset, "torch_version": torch.__version__, "max_abs_logit_difference": difference,
                             # Ties the export to the weights it came from: a retrained bundle makes it stale (OnnxRunner).
                             "weights_sha256": file_sha256(run.path / "model.safetensors"),
                             "onnx_sha256": file_sha256(tmp_path)})
                # Both new files are whole before the old pair is touched: a full disk or Ctrl-C until here keeps it.
                write_text(spec_tmp, json.dumps(spec, indent=2))
                onnx_path.unlink(missing_ok=True)  # renames alone from here; a kill leaves preprocessing.json alone: unfinished
                spec_tmp.replace(spec_path)
            except BaseException:
                tmp_path.unlink(missing_ok=True)
                spec_tmp.unlink(missing_ok=True)
                raise
        tmp_path.replace(onnx_path)
        return onnx_path


def _storage_error(e: BaseException) -> OSError | None:
    """The full disk or forbidden folder behind an exporter's error (raised as such, or wrapped), if one is."""
    while e is not None:
        if storage_problem(e) is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _is_our_spec(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _session(path: Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise CxrFastError("ONNX Runtime is not installed: pip install 'cxr_fast[onnx]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for damaged or foreign files
        raise CxrFastError(f"{path}: ONNX Runtime cannot load it ({first_line(e)})") from None


class OnnxRunner:
    """An export folder (model.onnx + preprocessing.json) run by ONNX Runtime on the CPU.

    Same attributes and `logits` as `cxr_fast.predict.TorchRunner`, so prediction and serving take either.
    """

    runtime = "onnx"

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.path = Path(folder)
        onnx_path, spec_path = self.path / ONNX_FILE, self.path / PREPROCESSING_FILE
        # In a run folder the export is remade from it; a folder of its own (export --out DIR) needs --out again.
        run = self.path if (self.path / "config.json").is_file() else "RUN"
        make = f"cxrfast export {run}" + ("" if run == self.path else f" --out {self.path}")
        for needed in (onnx_path, spec_path):
            if not needed.is_file():
                raise CxrFastError(f"{self.path}: no ONNX export ({needed.name} missing); make it with `{make}`")
        spec = read_json(spec_path)
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
            raise CxrFastError(f"{spec_path}: not a cxr_fast ONNX export (format {found!r})")
        missing = [k for k in SPEC_KEYS if k not in spec]
        if missing:
            raise CxrFastError(f"{spec_path}: lacks {', '.join(missing)}; re-export with `{make} --force`")
        problem = contract_problem(spec)
        if problem:
            raise CxrFastError(f"{spec_path}: {problem}")
        weights = self.path / "model.safetensors"
        if weights.is_file() and spec.get("weights_sha256") != file_sha256(weights):
            raise CxrFastError(f"{onnx_path}: exported from other weights than {weights.name}; "
                               f"re-export with `{make} --force`")
        # The pair must belong together: a model.onnx copied from another export, or an export interrupted
        # between its two files, would otherwise run with the wrong classes, size or temperature.
        if "onnx_sha256" in spec and spec["onnx_sha256"] != file_sha256(onnx_path):
            raise CxrFastError(f"{onnx_path}: not the model {PREPROCESSING_FILE} was written for (changed or "
                               f"copied since); re-export with `{make} --force`")
        self.spec = spec
        self.session = _session(onnx_path, threads)
        # The network's own shapes against the spec: an edited size, n_in or class list would otherwise fail
        # inside ONNX Runtime on the first image, or label K outputs with other names.
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise CxrFastError(f"{onnx_path}: a model of {len(inputs)} inputs and {len(outputs)} outputs; a cxr_fast "
                               "export has one of each")
        (given,), (made,) = inputs, outputs
        expected = {"input": [self.n_in, self.size, self.size], "output": [len(self.classes)]}
        for role, node in (("input", given), ("output", made)):
            fixed = list(node.shape[1:])
            if fixed != expected[role]:
                raise CxrFastError(f"{spec_path}: the model's {role} is {fixed} per image, but this file says "
                                   f"{expected[role]}; re-export with `{make} --force`")

    name = property(lambda self: self.spec["run"])
    arch = property(lambda self: self.spec["arch"])
    classes = property(lambda self: list(self.spec["classes"]))
    size = property(lambda self: int(self.spec["size"]))
    n_in = property(lambda self: int(self.spec["n_in"]))
    mean = property(lambda self: list(self.spec["mean"]))
    std = property(lambda self: list(self.spec["std"]))
    temperature = property(lambda self: float(self.spec["temperature"]))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Normalised float input [B, n_in, size, size] → logits [B, K] (float32)."""
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def torch_module(self):
        """The session as a torch module, for occlusion maps (`cxr_fast.attribution` takes a module)."""
        import torch

        runner = self

        class OnnxModule(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(runner.logits(x.detach().cpu().numpy()))

        return OnnxModule()
