"""The tokenize step: extracted JSONL -> a SentencePiece tokenizer + Megatron ``.bin``/``.idx``.

* ``mtnlg.tokenize.tokenize.tokenize`` - the step itself (``mtnlg tokenize``);
* ``mtnlg.tokenize.config.TokenizeConfig`` - its typed settings.

The file formats it writes (``mtnlg.formats.tokenizer``, ``mtnlg.formats.indexed_dataset``)
sit below it, shared with the trainer and the evaluator.
"""
