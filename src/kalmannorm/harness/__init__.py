"""The lab wing of kalmannorm: the training harness behind the ``kalmannorm`` command.

``train`` (dataclass configs, recipes, an importable :func:`~kalmannorm.harness.train.train`),
``data`` (in-memory datasets), ``models`` (the CIFAR pre-activation ResNet and ResNet-18/50),
``records`` (JSON run records), ``report`` (tables and plots from records) and ``cli``. It
imports the library (``import kalmannorm``) and never the other way round; its extra packages
come with ``pip install 'kalmannorm[train]'`` (see :mod:`kalmannorm.harness.extras`).
"""
