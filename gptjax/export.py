"""A trained model in another library's format: `python -m gptjax.export`.

    python -m gptjax.export --model PATH --to hf OUT

PATH is a final model or a snapshot (as for gptjax.evaluate); OUT becomes a folder that
`transformers.GPT2LMHeadModel.from_pretrained(OUT)` loads (config.json, model.safetensors) and,
for the gpt2 tokenizer, `AutoTokenizer.from_pretrained(OUT)` too (vocab.json, merges.txt and their
configs). The gpt4 and gpt4o tokenizers (tiktoken's cl100k_base, o200k_base) have no
GPT2Tokenizer form: their weights and config are exported, their tokenizer is not. The mapping is
gptjax.hf's; it needs the hf extra (pip install -e '.[hf]').
"""
import sys

from gptjax import cli

FORMATS = ("hf",)


def _define_flags(fv):
  from absl import flags
  flags.DEFINE_string("model", None, "final model directory (models/model_<TIMESTAMP>/) or "
                      "snapshot directory (snapshots/snapshot_<step>/)", flag_values=fv)
  flags.DEFINE_enum("to", "hf", list(FORMATS), "format: hf (a Hugging Face transformers GPT-2 "
                    "folder)", flag_values=fv)


def run(argv) -> dict:
  """Parses `argv`, exports, prints what was written and returns it."""
  from gptjax import hf
  fv, (out_dir,) = cli.parse_flags_and_arguments(
      argv, _define_flags, "python -m gptjax.export --model PATH --to hf OUT", ("OUT",))
  result = hf.export_model(fv.model or "", out_dir)
  print(f"Exported {fv.model} to {result['out_dir']}: {', '.join(result['files'])}")
  if not result["tokenizer_exported"]:
    print(f"The {result['tokenizer']} tokenizer is not exported: tiktoken's encoding has no "
          "GPT2Tokenizer form; encode with tiktoken (gptjax.data.get_tokenizer) and pass the ids")
  return result


def main(argv=None) -> int:
  return cli.entry_point(run, argv)


if __name__ == "__main__":
  sys.exit(main())
