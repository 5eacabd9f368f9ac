"""[fields.*], [transform] and [arrays.*]: what a worker reads and decodes from each document,
the user's functions, and the arrays of every batch (with their padding, lengths and casts).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from ...errors import ConfigError
from .model import VARIABLE, ArrayConfig, FieldConfig, TransformConfig
from .schema import SCHEMA, TEXT_DECODERS, checked_table, entries
from .sources import check_collection

PAD_TO = ("longest", "max_length")
LENGTHS_DTYPE = "int32"
MAX_SAMPLE_DIMS = 31           # numpy arrays have at most 32 dimensions, one is the batch


def parse_field(name: str, values: dict[str, Any], where: str) -> FieldConfig:
    """One [fields.NAME] table (its keys already checked against the schema): the decoder,
    dtype, shape and transforms that fit together."""
    key = f"fields.{name}"
    shape = values["shape"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ConfigError(f"{where}: {key}.shape must be a list of positive integers, "
                          f"not {shape!r}")
    if len(shape) > MAX_SAMPLE_DIMS:
        raise ConfigError(f"{where}: {key}.shape has {len(shape)} dimensions, at most "
                          f"{MAX_SAMPLE_DIMS}")
    path = values["path"] if values["path"] is not None else name
    if not all(part and not part.startswith("$") for part in path.split(".")):
        raise ConfigError(f"{where}: {key}.path {path!r} is not a dotted path of field names "
                          f"(no empty part, none starting with $)")
    if values["gridfs"]:
        check_collection(values["bucket"], f"{key}.bucket", where)
    values = {**values, "shape": tuple(shape), "path": path}
    decode, dtype = values["decode"], values["dtype"]
    if decode in TEXT_DECODERS:
        given = [k for k in ("dtype", "cast", "scale", "one_hot") if values[k] is not None]
        if given or shape:
            raise ConfigError(f"{where}: {key}: decode = {decode!r} hands the value to the "
                              f"[transform] functions as it is: remove "
                              f"{', '.join(given + (['shape'] if shape else []))}")
    elif dtype is None:
        raise ConfigError(f"{where}: {key}.dtype is required ({SCHEMA['fields.*']['dtype'].doc})")
    if decode == "scalar" and shape:
        raise ConfigError(f"{where}: {key}.shape must be [] with decode = 'scalar'")
    if decode in ("raw", "npy", "list", "image", "pickle") and not shape:
        raise ConfigError(f"{where}: {key}.shape is required with decode = {decode!r}")
    if decode == "image" and (dtype != "uint8" or len(shape) != 3 or shape[2] not in (1, 3, 4)):
        raise ConfigError(f"{where}: {key}: decode = 'image' needs dtype = 'uint8' and "
                          f"shape = [height, width, channels] with 1, 3 or 4 channels")
    if decode == "image" and not _pillow_imports():
        raise ConfigError(f"{where}: {key}.decode = 'image' needs Pillow, which does not "
                          f"import here: pip install 'mongofeed[image]'")
    if decode == "pickle" and not values["allow_pickle"]:
        raise ConfigError(f"{where}: {key}: decode = 'pickle' runs code stored in the database;"
                          f" set {key}.allow_pickle = true if you trust that data")
    if values["gridfs"] and decode not in ("raw", "npy", "image", "pickle", "bytes"):
        raise ConfigError(f"{where}: {key}: gridfs = true needs a bytes decoder "
                          f"(raw, npy, image, pickle or bytes), not {decode!r}")
    one_hot = values["one_hot"]
    if one_hot is not None and (one_hot < 2 or shape or not dtype.startswith(("int", "uint"))):
        raise ConfigError(f"{where}: {key}.one_hot needs an integer scalar field "
                          f"(decode = 'scalar', an int dtype) and at least 2 classes")
    if one_hot is not None and values["cast_on"] == "consumer":
        raise ConfigError(f"{where}: {key}: one_hot runs in the daemon; remove cast_on = "
                          f"'consumer' (one-hot labels are small on the wire)")
    target = values["cast"] or ("float32" if values["one_hot"] else dtype)
    _check_scale(key, values["scale"], target, where)
    return FieldConfig(name=name, **values)


def _check_scale(key: str, scale, target: str | None, where: str):
    if scale is None:
        return
    if not target.startswith("float"):
        raise ConfigError(f"{where}: {key}.scale needs a float result: add cast = 'float32'")
    if not math.isfinite(scale):
        raise ConfigError(f"{where}: {key}.scale must be a finite number")


_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def parse_transform(values: dict[str, Any], where: str) -> TransformConfig:
    """[transform]: function references checked for form (``serve`` imports them), the
    folders to import from made absolute (relative to the config file) and checked."""
    for key in ("document", "batch"):
        ref = values[key]
        if ref is not None and not _FUNCTION_REF.match(ref):
            raise ConfigError(f"{where}: transform.{key} = {ref!r} is not \"module:function\" "
                              f"(e.g. \"myproject.prep:transform\")")
    for key in ("reads", "paths"):
        if not all(isinstance(item, str) and item for item in values[key]):
            raise ConfigError(f"{where}: transform.{key} must be a list of non-empty strings, "
                              f"not {values[key]!r}")
    base = os.getcwd() if where.startswith("<") else os.path.dirname(os.path.abspath(where))
    paths = tuple(os.path.normpath(os.path.join(base, folder)) for folder in values["paths"])
    for folder, path in zip(values["paths"], paths, strict=True):
        if not os.path.isdir(path):
            raise ConfigError(f"{where}: transform.paths: folder {folder!r} ({path}) does not "
                              f"exist (relative paths start at the config file's folder)")
    if values["reads"] and not (values["document"] or values["batch"]):
        raise ConfigError(f"{where}: transform.reads names paths for the functions, but "
                          f"neither transform.document nor transform.batch is set")
    return TransformConfig(values["document"], values["batch"], tuple(values["reads"]), paths)


def parse_arrays(tables: dict[str, Any], fields: dict[str, FieldConfig],
                 transform: TransformConfig, where: str) -> dict[str, ArrayConfig]:
    """The arrays of every batch: the [arrays.*] tables (what the functions return, and the
    lengths of variable ones), or without them one per field as decoded."""
    if not tables:
        if not fields:
            raise ConfigError(f"{where}: no [fields.NAME] table: declare at least one field")
        for f in fields.values():
            if f.is_text:
                raise ConfigError(f"{where}: field {f.name!r} (decode = {f.decode!r}) is an "
                                  f"input of the [transform] functions, never an array itself:"
                                  f" declare the arrays they return in [arrays.NAME] tables")
        return {name: f.as_array() for name, f in fields.items()}
    if not transform.functions:
        raise ConfigError(f"{where}: [arrays.*] declares what the [transform] functions "
                          f"return: set transform.document or transform.batch (without them "
                          f"the [fields.*] are the arrays)")
    arrays = {}
    for name, body in entries(tables, "arrays", where):
        values = checked_table(body, f"arrays.{name}", SCHEMA["arrays.*"], where)
        arrays[name] = _array(name, values, set(body), where)
    for array in list(arrays.values()):
        if array.lengths is None:
            continue
        if array.lengths in arrays:
            raise ConfigError(f"{where}: arrays.{array.name}.lengths = {array.lengths!r} names "
                              f"an array that exists already: choose another name")
        count = len(array.variable_dims)
        arrays[array.lengths] = ArrayConfig(array.lengths, LENGTHS_DTYPE,
                                            () if count == 1 else (count,),
                                            lengths_of=array.name)
    return arrays


def _array(name: str, values: dict[str, Any], given: set, where: str) -> ArrayConfig:
    key = f"arrays.{name}"
    shape, dtype = values["shape"], values["dtype"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == VARIABLE)
               for d in shape):
        raise ConfigError(f"{where}: {key}.shape must be a list of positive integers or -1 "
                          f"(a variable length), not {shape!r}")
    if VARIABLE in shape:
        max_length, pad_to = values["max_length"], values["pad_to"]
        if max_length is None or max_length < 1:
            raise ConfigError(f"{where}: {key}.max_length (a positive integer) is required "
                              f"with a -1 in shape: it bounds the memory of a batch")
        if not (pad_to in PAD_TO or (isinstance(pad_to, int) and pad_to >= 1)):
            raise ConfigError(f"{where}: {key}.pad_to must be 'longest', 'max_length' or a "
                              f"positive integer, not {pad_to!r}")
        pad = np.array(values["pad_value"])
        if not (math.isfinite(values["pad_value"]) and pad.astype(dtype) == pad):
            raise ConfigError(f"{where}: {key}.pad_value {values['pad_value']!r} is not a "
                              f"value of dtype {dtype}")
    else:
        variable_only = sorted({"max_length", "pad_to", "pad_value", "lengths"} & given)
        if variable_only:
            raise ConfigError(f"{where}: {key}: {', '.join(variable_only)} apply to a "
                              f"variable dimension only (-1 in shape)")
    _check_scale(key, values["scale"], values["cast"] or dtype, where)
    return ArrayConfig(name=name, **{**values, "shape": tuple(shape)})


def _pillow_imports() -> bool:
    """Whether Pillow imports: checked with the config so that a missing Pillow stops
    ``serve`` at once instead of failing the first batch of every session."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True
