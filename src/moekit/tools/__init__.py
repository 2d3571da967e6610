"""What ships beside the backend: the command line (``cli``) and its commands ``demo``, ``bench`` and ``check``,
and the embedded tiny models they and the tests build (``tiny``)."""
