"""SGLang's own request classes and validators, taken from the installed ``sglang`` wheel.

The project installs ``sglang==0.5.23`` with ``--no-deps`` for its tests (Makefile): its source
is there, but its runtime (CUDA scheduler, sgl-kernel) is not, so ``import sglang`` fails. The
pieces the client's requests are judged by are read from that source as the tests run, without
running SGLang's package __init__:

* ``sglang.api.v1.api_types`` (msgspec only): the /generate JSON contract the 0.5.23 server
  applies before anything else (entrypoints/api_contract.py), imported under a stub top-level
  package;
* ``sglang.srt.sampling.sampling_params.SamplingParams`` with its ``verify``, what the server
  does with each sampling_params object;
* the control request classes of ``srt/managers/io_struct.py`` (msgspec Structs parsed by
  FastAPI through their pydantic schema, ``utils/msgspec_utils.py``), whose module cannot
  import here: their class definitions are cut out of the file with ``ast`` and executed;
* ``SafeUnpickler`` (``utils/common.py``, same way) and ``Base64Bytes``: how a server decodes
  /update_weights_from_tensor payloads.

    contract = sglang_contract.load()          # None: sglang not installed (run `make setup`)
    contract.check("/generate", body)          # raises ContractError with SGLang's own message

Beyond SGLang's own checks (which ignore unknown control fields), a field that the class does
not have is an error here too: the server would silently drop it.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import pickle
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

VERSION = "0.5.23"

CONTROL = {
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
    "/abort_request": "AbortReq",
    "/update_weight_version": "UpdateWeightVersionReqInput",
}
GET_ONLY = {"/health", "/health_generate", "/model_info", "/get_model_info", "/server_info", "/get_server_info",
            "/flush_cache"}


class ContractError(ValueError):
    """A request SGLang would refuse, or whose fields it would drop."""


def sglang_root() -> Path | None:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _module_from_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _cut(path: Path, names: set[str]) -> str:
    """The source of the top-level classes / functions ``names`` of ``path``."""
    source = path.read_text()
    tree = ast.parse(source)
    def name(n):
        if isinstance(n, (ast.ClassDef, ast.FunctionDef)):
            return n.name
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            return n.targets[0].id
        return None

    found = [n for n in tree.body if name(n) in names]
    missing = names - {name(n) for n in found}
    if missing:
        raise RuntimeError(f"{path} has no {sorted(missing)}: another SGLang release than {VERSION}?")
    return "\n\n".join(ast.get_source_segment(source, n) for n in found)


class Contract:
    """See the module docstring."""

    def __init__(self, root: Path):
        import msgspec
        import pydantic

        self.root = root
        self.version = (root.parent / f"sglang-{VERSION}.dist-info").is_dir() and VERSION or "?"
        if "sglang" not in sys.modules:  # a stub package: submodules import without sglang/__init__.py
            stub = types.ModuleType("sglang")
            stub.__path__ = [str(root)]
            sys.modules["sglang"] = stub
        from sglang.api.v1 import api_types
        from sglang.srt.sampling.sampling_params import SamplingParams

        self.api_types = api_types
        self.SamplingParams = SamplingParams
        mu = _module_from_file("sglang_contract_msgspec_utils", root / "srt/utils/msgspec_utils.py")
        self.Base64Bytes = mu.Base64Bytes
        io_struct = types.ModuleType("sglang_contract_io_struct")
        sys.modules[io_struct.__name__] = io_struct
        import typing

        io_struct.__dict__.update({k: getattr(typing, k) for k in ("Any", "Dict", "List", "Literal", "Optional",
                                                                    "Tuple", "Union", "Annotated")})
        io_struct.__dict__.update(msgspec=msgspec, Base64Bytes=mu.Base64Bytes, FinishReasonDict=Any,
                                  WeightVersionSpans=Any,
                                  msgspec_struct_pydantic_core_schema=mu.msgspec_struct_pydantic_core_schema)
        exec(compile(_cut(root / "srt/managers/io_struct.py", {"BaseReq", *CONTROL.values()}),
                     str(root / "srt/managers/io_struct.py"), "exec"), io_struct.__dict__)
        self.classes = {path: getattr(io_struct, name) for path, name in CONTROL.items()}
        self.adapters = {path: pydantic.TypeAdapter(cls) for path, cls in self.classes.items()}
        unpickling = types.ModuleType("sglang_contract_unpickler")
        unpickling.__dict__.update(io=io, pickle=pickle, torch=__import__("torch"))
        exec(compile(_cut(root / "srt/utils/common.py", {"SafeUnpickler", "_safe_load_torch_storage"}),
                     str(root / "srt/utils/common.py"), "exec"), unpickling.__dict__)
        self.SafeUnpickler = unpickling.SafeUnpickler

    # ------------------------------------------------------------------ checks

    def check(self, path: str, body: Any, vocab_size: int = 1 << 20) -> Any:
        """Raise ContractError if SGLang 0.5.23 would refuse ``body`` at ``path`` (or drop a field of
        it); returns the parsed request (a control class instance) where there is one."""
        path = path.split("?")[0]
        if path == "/generate":
            return self._check_generate(body, vocab_size)
        if path in self.adapters:
            if not isinstance(body, dict):
                raise ContractError(f"{path}: the body must be a JSON object, got {type(body).__name__}")
            import msgspec
            import pydantic

            fields = {f.name for f in msgspec.structs.fields(self.classes[path])}
            unknown = sorted(set(body) - fields)
            if unknown:
                raise ContractError(f"{path}: field(s) {unknown} are not in SGLang's {self.classes[path].__name__} "
                                    f"(fields: {sorted(fields)}); the server would ignore them")
            try:
                return self.adapters[path].validate_python(body)
            except (pydantic.ValidationError, TypeError, ValueError) as exc:
                raise ContractError(f"{path}: {exc}") from None
        if path in GET_ONLY:
            return None
        raise ContractError(f"{path}: not an endpoint this client may use")

    def _check_generate(self, body: Any, vocab_size: int) -> Any:
        try:
            req = self.api_types.GenerateRequest.from_json_value(body)
        except self.api_types.JsonContractError as exc:
            raise ContractError(f"/generate: {exc}") from None
        ids = body.get("input_ids")
        if ids is None or (isinstance(ids, list) and not ids):
            raise ContractError("/generate: input_ids must be a non-empty list (the client sends token ids)")
        single = isinstance(ids[0], int)
        n = 1 if single else len(ids)
        rid = body.get("rid")
        if isinstance(rid, list):  # GenerateReqInput._normalize_rid / _validate_rid_uniqueness
            if single or len(rid) != n:
                raise ContractError("/generate: The specified rids length mismatch with the batch_size for batch processing.")
            if len(set(rid)) != len(rid):
                raise ContractError(f"/generate: Duplicate request IDs detected within the request: {rid}")
        params = body.get("sampling_params") or {}
        params = params if isinstance(params, list) else [params]
        if len(params) not in (1, n) or (single and len(params) != 1):
            raise ContractError(f"/generate: {len(params)} sampling_params for {n} inputs")
        for sp in params:
            try:
                s = self.SamplingParams(**sp)
                s.verify(vocab_size)
            except (TypeError, ValueError) as exc:
                raise ContractError(f"/generate sampling_params: {exc}") from None
        return req

    def patch_cuda_rebuild(self) -> None:
        """What SGLang's server does before it decodes IPC payloads (utils/patch_torch.py,
        monkey_patch_torch_reductions): torch's rebuild_cuda_tensor takes the device as an index
        or as a device UUID, which it maps to the index this process sees."""
        from torch.multiprocessing import reductions

        if hasattr(reductions, "_rebuild_cuda_tensor_original"):
            return
        ns = types.ModuleType("sglang_contract_patch_torch")
        ns.__dict__.update(torch=__import__("torch"), reductions=reductions, Callable=Any, Union=Any)
        exec(compile(_cut(self.root / "srt/utils/patch_torch.py", {
            "_rebuild_cuda_tensor_modified", "_device_from_maybe_uuid", "_modify_tuple",
            "_REDUCE_TENSOR_ARG_DEVICE_INDEX"}), str(self.root / "srt/utils/patch_torch.py"), "exec"), ns.__dict__)
        reductions._rebuild_cuda_tensor_original = reductions.rebuild_cuda_tensor
        reductions.rebuild_cuda_tensor = ns._rebuild_cuda_tensor_modified
        reductions.init_reductions()

    def decode_tensors(self, entry: bytes | str) -> Any:
        """One /update_weights_from_tensor payload entry, decoded as the server does."""
        if isinstance(entry, str):
            entry = self.Base64Bytes._decode_value(entry)
        return self.SafeUnpickler(io.BytesIO(entry)).load()


@lru_cache(maxsize=1)
def load() -> Contract | None:
    root = sglang_root()
    return None if root is None else Contract(root)
