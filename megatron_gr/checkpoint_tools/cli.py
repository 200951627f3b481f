"""The ``megatron-gr checkpoint`` verbs (wired into ``megatron_gr.cli``).

    megatron-gr checkpoint inspect DIR|FILE [--json] [--config]
    megatron-gr checkpoint convert DIR --out FILE.pt|FILE.safetensors [--with-optimizer] [--dtype bf16|fp32]
    megatron-gr checkpoint convert FILE --out DIR [--dtype bf16|fp32]
    megatron-gr checkpoint reshard DIR --tensor-model-parallel-size T --pipeline-model-parallel-size P --out DIR2
        [--context-parallel-size C] [--data-parallel-size D]
    megatron-gr checkpoint import-gr FILE --config YAML --out DIR
    megatron-gr checkpoint export-gr DIR --out FILE

Bad input is one ``error: ...`` line (exit code 2) and nothing is written.
"""

from __future__ import annotations

import argparse

from megatron_gr.checkpoint_tools.content import DTYPES


def add_parser(commands) -> None:
    parser = commands.add_parser("checkpoint", help="inspect, convert, reshard, import and export checkpoints (no training)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    inspect = verbs.add_parser("inspect", help="step, layout, config, tensors and dynamic tables of a checkpoint or file")
    inspect.add_argument("path", help="a --save directory, one of its iter_*/best directories, or a converted file")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--config", action="store_true", help="also print the saved config")

    convert = verbs.add_parser("convert", help="a checkpoint directory to one .pt/.safetensors file, or a file back")
    convert.add_argument("source", help="a checkpoint directory, or a file written by convert")
    convert.add_argument("--out", required=True, help="FILE.pt / FILE.safetensors (from a directory) or a new directory (from a file)")
    convert.add_argument("--with-optimizer", action="store_true",
                         help="also the optimizer state, schedule and train state: the file converts back to a checkpoint that resumes training")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the weights written (default: as saved)")

    reshard = verbs.add_parser("reshard", help="rewrite a checkpoint as a run of another parallel layout saves it")
    reshard.add_argument("source", help="a checkpoint directory")
    reshard.add_argument("--out", required=True, help="a new directory")
    reshard.add_argument("--tensor-model-parallel-size", type=int, required=True)
    reshard.add_argument("--pipeline-model-parallel-size", type=int, required=True)
    reshard.add_argument("--context-parallel-size", type=int, default=1,
                         help="context-parallel ranks of the target layout (default 1)")
    reshard.add_argument("--data-parallel-size", type=int, default=1,
                         help="data-parallel ranks of the target layout (dynamic tables are sharded over them; default 1)")
    reshard.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the weights written (default: as saved)")

    import_gr = verbs.add_parser("import-gr", help="a generative-recommenders HSTU retrieval state dict -> a checkpoint directory")
    import_gr.add_argument("source", help="a torch file holding the state dict (or a dict with 'state_dict'/'model')")
    import_gr.add_argument("--config", required=True, help="the megatron_gr config YAML describing the same model")
    import_gr.add_argument("--out", required=True, help="a new directory")

    export_gr = verbs.add_parser("export-gr", help="a checkpoint directory -> a generative-recommenders HSTU state dict file")
    export_gr.add_argument("source", help="a checkpoint directory")
    export_gr.add_argument("--out", required=True, help="a new .pt file")


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES.get(getattr(args, "dtype", None) or "")
    if args.verb == "inspect":
        from megatron_gr.checkpoint_tools.inspect_report import as_json, describe, render

        report = describe(args.path)
        print(as_json(report) if args.json else render(report, show_config=args.config))
    elif args.verb == "convert":
        from megatron_gr.checkpoint_tools.convert import convert

        print(convert(args.source, args.out, dtype=dtype, with_optimizer=args.with_optimizer))
    elif args.verb == "reshard":
        from megatron_gr.checkpoint_tools.reshard import reshard

        print(reshard(args.source, args.out, tensor=args.tensor_model_parallel_size,
                      pipeline=args.pipeline_model_parallel_size, context=args.context_parallel_size,
                      data=args.data_parallel_size, dtype=dtype))
    elif args.verb == "import-gr":
        from megatron_gr.interop.gr_checkpoint import import_gr_checkpoint

        print(import_gr_checkpoint(args.source, config_path=args.config, out=args.out))
    elif args.verb == "export-gr":
        from megatron_gr.interop.gr_checkpoint import export_gr_checkpoint

        print(export_gr_checkpoint(args.source, out=args.out))
    return 0
