from common import Case

CASES = [Case("cnn_plain", ["foldbn"])]
