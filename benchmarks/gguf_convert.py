"""Convert a checkpoint in the released layout to GGUF with llama.cpp's own converter, for the
peer columns of ``big_model.py``.

    python benchmarks/gguf_convert.py CONVERTER_DIR CKPT OUT.gguf --outtype q8_0

CONVERTER_DIR is ``vendor/llama.cpp`` of the llama-cpp-python sdist (``convert_hf_to_gguf.py``
and its ``conversion`` package; it needs transformers 4.x, sentencepiece, protobuf<5 and gguf,
best in a separate environment). A tokenizer trained here has a BPE pre-tokenizer the converter
does not know by hash; it is written as ``gpt-2``'s (byte-level, the same splitting), instead
of the converter refusing it. Run with ``--requantize Q4_0 IN.gguf OUT.gguf`` (llama-cpp-python
installed) to make a Q4_0 file from a Q8_0 one without a 33 GB f16 intermediate.
"""

import runpy
import sys
from pathlib import Path


def requantize(src: str, dst: str, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def main() -> None:
    if sys.argv[1] == "--requantize":
        requantize(sys.argv[3], sys.argv[4], sys.argv[2])
        return
    converter = Path(sys.argv[1])
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def with_fallback(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = with_fallback
    ckpt, out, *rest = sys.argv[2:]
    sys.argv = [str(converter / "convert_hf_to_gguf.py"), ckpt, "--outfile", out, *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
