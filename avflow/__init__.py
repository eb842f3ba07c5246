"""avflow: joint text -> speech + talking-avatar motion generation by flow matching (AV-Flow).

Stages, each a sub-package, imported only downwards:
config/utils <- data <- model <- train <- export/infer <- cli.
"""

__version__ = "0.1.0"
