from aura.cli import main

raise SystemExit(main())
