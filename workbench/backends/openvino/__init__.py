"""OpenVINO (the `openvino` extra): fp32, and static int8 through NNCF, on the CPU. Models are `OvModel`s, saved as
OpenVINO IR (`model.xml` + `model.bin`) and reloaded with the same inputs and outputs as the torch model.

The torch model, flattened to the workbench's tensors-in, tensors-out contract, goes through OpenVINO's own
PyTorch frontend (`ov.convert_model`), or, where that cannot take it or its trace keeps the example's shapes,
through the workbench's ONNX export, which OpenVINO reads. fp32 runs with `INFERENCE_PRECISION_HINT=f32`: on CPUs
with AMX or AVX-512 bf16 OpenVINO otherwise computes an "fp32" model in bf16, which is a different precision with
a different fidelity. int8 is NNCF's post-training quantization with its transformer preset (SmoothQuant and fast
bias correction) where Linear layers carry the MACs, its default preset for conv nets; calibrated on train batches.

Importing this package stays light: openvino and nncf load when a model is lowered, run or saved.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ...contract import bind, other_shapes, rebuild
from ...errors import DeviceError, ExportError, WorkbenchError, first_line
from ...registry import register_backend
from ...tensors import call_model
from .. import Backend, check_parity, installed_versions, optional


def _ov():
    return optional("openvino")


class OvModel:
    """An OpenVINO model compiled for the CPU, callable like the torch model it came from."""

    def __init__(self, xml: bytes, weights: bytes, layout: dict, threads: int | None = None, label: str = "fp32"):
        self.xml, self.weights, self.layout = xml, weights, dict(layout)
        self.layout.setdefault("call_names", self.layout["input_names"])
        self.layout.setdefault("outputs", None)
        self.threads, self.label, self.device = threads, label, "cpu"
        self._compiled = None

    @property
    def input_names(self) -> list[str]:
        return self.layout["input_names"]

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, layout: dict, threads: int | None = None) -> "OvModel":
        ov = _ov()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "model.onnx")
            path.write_bytes(onnx_bytes)
            return cls.from_ov(ov.Core().read_model(str(path)), layout, threads)

    @classmethod
    def from_torch(cls, model, example_inputs, threads: int | None = None) -> "OvModel":
        """Through OpenVINO's own PyTorch frontend (`ov.convert_model`, how its users convert): attention stays
        one ScaledDotProductAttention op, which NNCF leaves in float, where the ONNX route hands OpenVINO ~10 ops
        per layer and NNCF quantizes the two attention products (minilm int8, batch 1 of 64 tokens, 2 threads:
        2.9 against 3.2 ms)."""
        import torch

        from ...contract import flat_module, to_trace, values_of
        from ...scoped import layer_by_layer

        ov = _ov()
        model, example_inputs, layout = to_trace(model, example_inputs)
        with torch.inference_mode(), layer_by_layer():  # torch's transformer layers as the traceable ones
            converted = ov.convert_model(flat_module(model, layout), example_input=tuple(values_of(example_inputs)))
        for port, name in zip(converted.inputs, layout["input_names"]):
            port.get_tensor().set_names({name})
        return cls.from_ov(converted, layout, threads)

    @classmethod
    def from_ov(cls, model, layout: dict, threads: int | None = None, label: str = "fp32") -> "OvModel":
        ov = _ov()
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp, "model.xml")
            ov.save_model(model, str(xml), compress_to_fp16=False)
            return cls(xml.read_bytes(), xml.with_suffix(".bin").read_bytes(), layout, threads, label)

    def read(self):
        """The openvino.Model (not compiled)."""
        import numpy as np

        ov = _ov()
        return ov.Core().read_model(model=self.xml.decode(), weights=ov.Tensor(np.frombuffer(self.weights, np.uint8)))

    @property
    def compiled(self):
        if self._compiled is None:
            ov = _ov()
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            self._compiled = ov.Core().compile_model(self.read(), "CPU", config)
        return self._compiled

    def placed(self, threads: int | None) -> "OvModel":
        return OvModel(self.xml, self.weights, self.layout, threads, self.label)

    def feed(self, *args, **kwargs) -> dict:
        """The compiled model's input feed (numpy arrays by input name) for a call like the original model's."""
        values = bind(self.layout, args, kwargs)
        wanted = {name for port in self.compiled.inputs for name in port.get_names()}
        return {n: v.detach().cpu().numpy() for n, v in zip(self.input_names, values) if n in wanted}

    def __call__(self, *args, **kwargs):
        import torch

        first = next((v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)), None)
        results = self.compiled(self.feed(*args, **kwargs))
        outputs = [torch.from_numpy(results[port].copy()) for port in self.compiled.outputs]
        if first is not None and first.device.type != "cpu":
            outputs = [t.to(first.device) for t in outputs]
        return rebuild(self.layout, outputs)

    def eval(self) -> "OvModel":
        return self

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}

    def check_parity(self, model, example_inputs, rtol: float = 1e-3) -> float:
        return check_parity(self, model, example_inputs, "the OpenVINO model", "backend='onnxruntime' or 'torch'",
                            rtol)

    def count_params(self) -> tuple[int, int]:
        """Elements and non-zeros of the model's weight constants (scalars left out)."""
        import numpy as np

        total = nonzero = 0
        for op in self.read().get_ordered_ops():
            if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 1 and \
                    op.get_output_element_type(0).is_real() | op.get_output_element_type(0).is_integral_number():
                arr = op.get_data()
                if arr.size > 1:
                    total += arr.size
                    nonzero += int(np.count_nonzero(arr))
        return total, nonzero

    def __repr__(self) -> str:
        return f"OvModel({self.label}, {len(self.weights) / 1e6:.2f} MB)"

    def save(self, path: Path) -> Path:
        from ...paths import write_atomic

        write_atomic(path.with_suffix(".bin"), self.weights)
        write_atomic(path.with_suffix(".json"), json.dumps({**self.layout, "label": self.label}))
        write_atomic(path, self.xml)
        return path

    @classmethod
    def load(cls, path: Path, threads: int | None = None) -> "OvModel":
        meta = json.loads(path.with_suffix(".json").read_text())
        label = meta.pop("label", "fp32")
        return cls(path.read_bytes(), path.with_suffix(".bin").read_bytes(), meta, threads, label)


@register_backend
class OpenVinoBackend(Backend):
    name = "openvino"
    title = "OpenVINO"
    files = ("model.xml",)
    calibrates_int8 = True  # NNCF smooths and corrects int8 itself

    def available(self, target) -> bool:
        return not target.is_cuda and _ov() is not None

    def precisions(self, target) -> tuple:
        if not self.available(target):
            return ()
        return ("fp32", "int8-static") if optional("nncf") is not None else ("fp32",)

    def accepts(self, model: Any) -> bool:
        return isinstance(model, OvModel)

    def place(self, model, target):
        return model.placed(target.threads)

    def lower(self, model, precision: str, ctx, calibration_batches: int = 8, **options):
        from ..onnxruntime.export import export_onnx

        if not hasattr(model, "named_modules"):
            raise DeviceError(f"OpenVINO lowers torch models; this is a {type(model).__name__}")
        if precision not in ("fp32", "int8-static"):
            raise ValueError(f"OpenVINO does not lower to {precision}")
        example = ctx.data.example_inputs
        try:
            def checked(lowered):  # at the example, and at other shapes: a trace must not keep the example's
                shapes = other_shapes(example, lowered.layout, model)
                for inputs in [example, *shapes]:
                    lowered.check_parity(model, inputs)
                return lowered, shapes

            try:  # OpenVINO's PyTorch frontend first; the ONNX graph where it cannot take the model
                lowered, shapes = checked(OvModel.from_torch(model, example, threads=ctx.target.threads))
            except Exception as e:
                logging.getLogger(__name__).info("OpenVINO's PyTorch frontend did not take the model: %s", e)
                lowered, shapes = checked(OvModel.from_onnx(*export_onnx(model, example), threads=ctx.target.threads))
            if precision == "int8-static":
                lowered = self._nncf_int8(lowered, model, ctx, calibration_batches)
                for inputs in shapes:  # runs at other batch sizes and lengths too
                    call_model(lowered, inputs)
        except WorkbenchError:
            raise
        except Exception as e:  # conversion, NNCF or inference failures: the model is not one OpenVINO takes
            raise ExportError(f"OpenVINO could not run this model: {first_line(e, 160, named=True)}; use "
                              "backend='onnxruntime' or 'torch'") from e
        return lowered

    def _nncf_int8(self, fp32: OvModel, model, ctx, batches: int) -> OvModel:
        import nncf

        from ...facts import ModelFacts
        from ...scoped import quiet

        transformer = not ModelFacts(model, ctx.data, ctx.target).conv_heavy
        feeds = [call_model(fp32.feed, inputs) for inputs, _ in ctx.data.train_batches(limit=batches)]
        ctx.progress(f"NNCF: calibrating int8 on {len(feeds)} train batches"
                     + (" (transformer preset: SmoothQuant, bias correction)" if transformer else ""), None)
        with quiet():
            quantized = nncf.quantize(fp32.read(), nncf.Dataset(feeds), subset_size=len(feeds),
                                      model_type=nncf.ModelType.TRANSFORMER if transformer else None)
        ctx.note("OpenVINO int8: NNCF post-training quantization"
                 + (" with its transformer preset (SmoothQuant, fast bias correction)" if transformer else "")
                 + f", calibrated on {len(feeds)} train batches")
        return OvModel.from_ov(quantized, fp32.layout, fp32.threads, "int8-static")

    def label_of(self, model) -> str:
        return f"{self.name}-{model.label}"

    def size_bytes(self, model) -> int:
        return len(model.xml) + len(model.weights)

    def count_params(self, model) -> tuple[int, int]:
        return model.count_params()

    def save(self, model, example_inputs, directory: Path) -> Path:
        return model.save(directory / "model.xml")

    def load(self, path: Path, target, trust_pickle: bool = False):
        if _ov() is None:
            raise DeviceError("this model was saved by OpenVINO, which is not installed: pip install "
                              "'workbench[openvino]'")
        return OvModel.load(path, threads=target.threads)

    deploy_suffix = ".xml"

    def export(self, model, example_inputs, path: Path) -> Path:
        return model.save(path)

    def usage(self, model, path: Path, input_names: list[str]) -> list[str]:
        feed = ", ".join(f"{n!r}: {n}" for n in input_names)
        return ["import openvino as ov",
                f"compiled = ov.Core().compile_model({str(path)!r}, 'CPU', {{'INFERENCE_PRECISION_HINT': 'f32'}})"
                f"  # {Path(path).with_suffix('.bin').name} beside it; f32 as measured (the default may be bf16)",
                f"outputs = compiled({{{feed}}})  # numpy arrays in, a dict of numpy arrays out"]

    def versions(self) -> dict:
        return installed_versions("openvino", "nncf")
