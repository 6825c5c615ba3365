"""Drawing only: matplotlib plots (``plots``) and offline circuitsvis pages (``html``). No analysis runs here."""
