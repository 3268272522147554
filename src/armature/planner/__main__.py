from armature.planner.main import main

raise SystemExit(main())
