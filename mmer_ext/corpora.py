"""Facts about the public corpora that both the data layer and the models need (so neither imports the other).

IEMOCAP's 6-class ERC data as DialogueGCN / MMGCN ship it: the class order of its labels and their frequencies, by
which MMGCN weights its NLL loss (:data:`mmer_ext.models.mmgcn.IEMOCAP_ERC_CLASS_WEIGHTS`) and which the synthetic
dialogues imitate (:func:`mmer_ext.data.make_synthetic_dialogues`).
"""

__all__ = ["IEMOCAP_ERC_CLASS_FREQUENCIES", "IEMOCAP_ERC_CLASS_NAMES"]

IEMOCAP_ERC_CLASS_NAMES = ("happy", "sad", "neutral", "angry", "excited", "frustrated")
#: Class frequencies of IEMOCAP's 6-class ERC data; MMGCN weights its NLL loss by their inverses (MMGCN, Hu et al., ACL 2021; github.com/hujingwen6666/MMGCN).
IEMOCAP_ERC_CLASS_FREQUENCIES = (0.086747, 0.144406, 0.227883, 0.160585, 0.127711, 0.252668)
