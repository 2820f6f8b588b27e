"""ImageNet-to-general label table and the script that generates it."""
