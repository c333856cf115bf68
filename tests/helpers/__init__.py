"""Helpers shared by the test modules (importable as ``helpers.*``: ``setup.cfg`` puts ``tests/`` on
pytest's ``pythonpath``; subprocesses that need them get it on ``PYTHONPATH``, see
:func:`helpers.repo.pythonpath`). Fixtures live in ``tests/conftest.py``.

* :mod:`helpers.repo`: the checkout's folders (``REPO``, ``SHARED_DATA``, ...), ``PYTHONPATH`` for
  subprocesses, loading a script of the checkout by path;
* :mod:`helpers.kernels`: where the Triton kernels run (``INTERPRET``, ``DEVICE``, ``needs_triton``)
  and their ahead-of-time sm_90 compile check;
* :mod:`helpers.numerics`: relative errors, cosines, unit-in-the-last-place comparisons;
* :mod:`helpers.models`: tiny Llama/Mistral models with PEFT LoRA, one training step's gradients;
* :mod:`helpers.encoders`: tiny RoBERTa/BERT classifiers with PEFT LoRA, comparison with HF+PEFT;
* :mod:`helpers.mlp_block`: operands, statistics and gradients of hyclora's MLP block Function;
* :mod:`helpers.graph_emulation`: CPU emulations of CUDA graph capture;
* :mod:`helpers.examples`: pieces of the example-pipeline tests (tokenizer, hyclora skip, glue.py);
* :mod:`helpers.longseq`: data, tokenizer and launcher runs of the long-sequence tests;
* :mod:`helpers.dist`: multi-process CPU (gloo) runs and their tiny Llama;
* :mod:`helpers.toy_fused`: a stand-in for hyclora's fused blocks for the ZeRO-3 tests.
"""
