from qkweights.cli import main

raise SystemExit(main())
