"""Front ends in the style of other toolkits, each a thin file over lowbit's native API.

``golden_stick`` (MindSpore Golden Stick SLB), ``paddleslim`` (QAT, PTQ, dynamic),
``nni`` (NNI quantizers), ``ddk`` (a phone vendor DDK's plug-in quantization) and ``mindspore``
(MindSpore QAT). Import the one you need: ``from lowbit.compat import nni``.
``docs/migrating.md`` maps every name to its native equivalent.
"""
