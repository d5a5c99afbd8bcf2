"""Quality measurements on labelled data (`casemine eval ...`)."""
