"""The scripts' side: each module owns a script's parser and ``main(argv)`` and turns its flags into
the library's dataclasses (``buffer`` for buffer.py, ``convexify``, ``distill`` for distill_ptm-st.py,
``evaluate`` for eval.py, ``quickstart``, ``shapes``), plus the flag helpers they share (``cli``) and
the data set-up they share (``context``). The library one level up never imports from here."""
