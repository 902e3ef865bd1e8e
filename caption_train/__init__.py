"""caption-train: fine-tune Hugging Face image-to-text models on folders of captioned images.

    python train2.py --dataset_dir dataset --output_dir runs --epochs 5
"""

__version__ = "0.1.0"
