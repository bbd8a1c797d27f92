from fsmount.cli import main

raise SystemExit(main())
