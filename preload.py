def preload(parser):
    parser.add_argument(
        "--layerdiffuse-models-dir",
        type=str,
        default=None,
        help="Folder of the LayerDiffuse weight files (default: models/layer_model)",
    )
